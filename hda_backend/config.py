"""Configuration: YAML files mapped onto dataclasses, with presets.

The dataclasses' defaults are the ``cpu`` preset (the default without CUDA): ``Config()`` is
``load_config("cpu")``, and each of its values is written once, here. The other presets live in
``hda_backend/presets/<name>.yaml`` as changes from it: ``tiny`` (tests) and ``paper`` (the paper's
sizes and recipe); ``cpu.yaml`` is empty. A user config file may name a preset to start from
(``preset: paper``) and override any field. Unknown fields and wrong types are refused with the file
and the dotted field name.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .avatar.gaussians import GaussianConfig
from .avatar.unet import UNetConfig
from .constants import NORMALIZATIONS, PREDICTIONS, PRESETS, PROJECTIONS, TOKENIZERS, spoken_list  # noqa: F401 - PRESETS re-exported
from .errors import HDAError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class BodyConfig:
    path: typing.Optional[str] = None  # SMPL-X-format .npz; None: $HDA_SMPLX_PATH, else the bundled open body
    num_betas: int = 10


@dataclass(frozen=True)
class UVConfig:
    res: int = 128


@dataclass(frozen=True)
class RenderConfig:
    size: int = 256
    backend: str = "auto"  # auto | cpu | cuda
    fov_deg: float = 30.0


@dataclass(frozen=True)
class FitConfig:
    # A shorter schedule with a higher learning rate than the paper's, after the appearance stage below,
    # so that a subject fits in about ten minutes on two cores (README, Fitting).
    steps: int = 600  # end-to-end steps from a fresh (seeded) initialisation
    init_steps: int = 200  # end-to-end steps when starting from another subject's weights (--init-from)
    lr: float = 5e-4
    warmup_steps: int = 50  # linear learning-rate warm-up
    lr_final: float = 0.1  # cosine decay after the warm-up to lr * lr_final at the last step (1: constant)
    weight_decay: float = 0.01
    lambda_l1: float = 1.0  # paper Eq. 9 weights
    lambda_ssim: float = 0.1
    lambda_lpips: float = 0.01
    lambda_mask: float = 0.1
    crop_margin: float = 0.1  # crop around the mask's bounding box, as a fraction of its size
    pose_jitter: float = 0.0  # std (radians) of noise on the pose the UNet sees, per joint, per step
    sh_degree_every: int = 0  # SH warm-up (as 3DGS): one more band every n steps up to gaussians.sh_degree; 0: all at once
    # The appearance stage (fit/appearance.py): a raw map fitted directly, then the UNet regressed onto it.
    map_steps: int = 1000  # steps fitting the per-texel map by rendering (0: no appearance stage)
    init_map_steps: int = 400  # the same with --init-from
    regress_steps: int = 600  # UNet regression steps onto the map, from a fresh initialisation
    init_regress_steps: int = 200  # the same with --init-from
    regress_lr: float = 1e-3
    cameras_per_step: int = 3  # training cameras of one frame rendered per step (one UNet forward)
    precision: str = "auto"  # of the UNet: auto (bfloat16 where the CPU/GPU runs it natively) | float32 | bfloat16
    checkpoint_every: int = 100
    log_every: int = 10
    lpips_alexnet: typing.Optional[str] = None  # torchvision-format AlexNet weights on disk
    seed: int = 0  # initialisation and view sampling


@dataclass(frozen=True)
class DiffusionConfig:
    """Stage 2, the weight-space diffusion model (paper §4.2-4.3; HyperDiffusion's recipe fills the gaps)."""

    tokenizer: str = "layer"  # layer (one token per conv layer, paper) | flat1d (ablation) | layer_chunked
    chunk_size: int = 4096  # values per token for flat1d / layer_chunked
    # Stage 2 in minutes on 2 CPU cores for ~24 avatars: a 4-block width-64 transformer (the paper's is
    # 12 blocks of width 512, see presets/paper.yaml).
    width: int = 64  # token width; not stated in the paper
    blocks: int = 4
    heads: int = 4
    ffn: int = 256
    dropout: float = 0.0
    # Each layer's input projection is the transpose of its output projection: half the parameters, so twice
    # the width (each layer's output rank) in one size; measured worse than untied (README, stage 2).
    tied_projections: bool = False
    # learned (zero-initialised, trained) | principal: fixed before training to the top principal directions of
    # each layer's weights in the training set, tied, with small learned heads (tokenizers.py; README, stage 2).
    projections: str = "learned"
    principal_rank: int = 0  # principal directions per layer (0: width); the file stores this many values per weight
    timesteps: int = 500  # T
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    lr: float = 2e-4
    weight_decay: float = 0.01
    batch: int = 16  # global batch (split over torchrun ranks); drawn with replacement when fewer avatars
    lr_decay: float = 0.9  # lr x lr_decay every lr_decay_every epochs
    lr_decay_every: int = 200
    epochs: int = 300  # an epoch is ceil(N / batch) steps
    ema_decay: float = 0.995
    checkpoint_every: int = 100  # steps
    log_every: int = 10  # steps
    normalization: str = "coordinate"  # the std per coordinate, or pooled per layer (the mean is per coordinate)
    norm_eps: float = 1e-3  # std floor, relative to the layer's pooled std
    # Global factor after standardising. None: 1/sqrt(ᾱ_{T-1} λ_max), at most 1, so that DDIM's starting noise
    # N(0, I) matches the noised data along its strongest direction (λ_max: its variance there).
    norm_scale: typing.Optional[float] = None
    # What the denoiser outputs: x0 (HyperDiffusion's and G.pt's choice), eps (the noise) or v = √ᾱ ε - √(1-ᾱ) x0.
    # Each layer's output is width-rank, so only x0 keeps samples on the decoder's span: an eps or v output
    # cannot remove the noise outside it (README, stage 2; scripts/diffusion_study.py measures all three).
    prediction: str = "x0"
    sample_steps: int = 50  # DDIM steps K
    # DDIM's η: 0 deterministic, 1 the DDPM posterior's variance. η = 1 measured better on every model of the
    # weight-set study (wider, less blend-like samples, closer to the training span; README, stage 2).
    # Model files written before the field (format 1, the bundled default among them) keep η = 0.
    sample_eta: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Config:
    preset: str = "cpu"
    body: BodyConfig = field(default_factory=BodyConfig)
    uv: UVConfig = field(default_factory=UVConfig)
    # position_scale: the position maps enter the UNet in units of 5 cm rather than metres, so that it
    # learns texel-sized detail in hundreds of steps (README, Fitting). Avatar files without the field
    # (made before it) keep UNetConfig's own default of 1.
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(position_scale=20.0))
    # SH degree 1: with a ring of cameras, degree 3 fits view-dependent colour that held-out cameras
    # disagree with (README, Fitting).
    gaussians: GaussianConfig = field(default_factory=lambda: GaussianConfig(sh_degree=1))
    render: RenderConfig = field(default_factory=RenderConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_preset() -> str:
    import torch

    return "paper" if torch.cuda.is_available() else "cpu"


def load_config(source: str | Path | None = None, overrides: dict | None = None) -> Config:
    """A preset name or a YAML file path (None: the default preset), then ``overrides`` (nested dict)."""
    source = source or default_preset()
    if str(source) in PRESETS:
        name, data = str(source), _read_yaml(PRESET_DIR / f"{source}.yaml")
    else:
        path = Path(source)
        if path.suffix not in (".yaml", ".yml") and not path.exists():
            raise HDAError(f"preset '{source}': unknown, expected one of {', '.join(PRESETS)} or a .yaml file")
        data = _read_yaml(path)
        name = data.pop("preset", None) or default_preset()
        if name not in PRESETS:
            raise HDAError(f"config {path}: field 'preset' is '{name}', expected one of {', '.join(PRESETS)}")
        data = _merge(_read_yaml(PRESET_DIR / f"{name}.yaml"), data)
    data = _merge(data, overrides or {})
    data["preset"] = name
    config = _build(Config, data, str(source), "")
    _check(config, str(source))
    return config


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise HDAError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise HDAError(f"config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise HDAError(f"config {path}: expected a mapping of sections at the top level")
    return data


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _build(cls, data, source: str, prefix: str, base=None):
    """``base`` (default: ``cls()``, so the ``cpu`` preset for :class:`Config`) with the fields in ``data``."""
    if not isinstance(data, dict):
        raise HDAError(f"config {source}: field '{prefix.rstrip('.')}' should be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise HDAError(f"config {source}: unknown field '{prefix}{key}', expected one of {', '.join(names)}")
    base = cls() if base is None else base
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, source, f"{prefix}{key}.", getattr(base, key))
        else:
            kwargs[key] = _coerce(hint, value, source, prefix + key)
    return dataclasses.replace(base, **kwargs)


def _coerce(hint, value, source: str, name: str):
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        raise HDAError(f"config {source}: field '{name}' is {value!r}, expected a {hint.__name__}")
    return float(value) if hint is float else value


def _check(config: Config, source: str) -> None:
    def bad(name, value, expected):
        raise HDAError(f"config {source}: field '{name}' is {value!r}, expected {expected}")

    from .uvmap import UV_RESOLUTIONS

    if config.uv.res not in UV_RESOLUTIONS:
        bad("uv.res", config.uv.res, f"one of {UV_RESOLUTIONS}")
    if (config.unet.in_channels, config.unet.out_channels) != (6, 59):
        bad("unet.in_channels/out_channels", (config.unet.in_channels, config.unet.out_channels), "(6, 59)")
    if not 0.0 < config.unet.position_scale <= 1000.0:
        bad("unet.position_scale", config.unet.position_scale, "in (0, 1000]")
    if not 1 <= config.unet.width <= 1024:
        bad("unet.width", config.unet.width, "1..1024")
    if not 1 <= config.unet.levels <= 6 or config.uv.res % (2 ** config.unet.levels):
        bad("unet.levels", config.unet.levels, "1..6 with uv.res divisible by 2**levels")
    if not 1 <= config.render.size <= 8192:
        bad("render.size", config.render.size, "1..8192")
    if config.render.backend not in ("auto", "cpu", "cuda"):
        bad("render.backend", config.render.backend, "auto, cpu or cuda")
    if not 0.0 < config.gaussians.init_opacity < 1.0:
        bad("gaussians.init_opacity", config.gaussians.init_opacity, "in (0, 1)")
    if not 0 <= config.gaussians.sh_degree <= 3:
        bad("gaussians.sh_degree", config.gaussians.sh_degree, "0..3")
    if not 0.0 < config.render.fov_deg < 170.0:
        bad("render.fov_deg", config.render.fov_deg, "in (0, 170)")
    if not 1 <= config.body.num_betas <= 300:
        bad("body.num_betas", config.body.num_betas, "1..300")
    _check_fit(config.fit, bad)
    _check_diffusion(config.diffusion, bad)


def _check_fit(f: FitConfig, bad) -> None:
    from .precision import PRECISIONS

    if f.precision not in PRECISIONS:
        bad("fit.precision", f.precision, " | ".join(PRECISIONS))
    many = 10_000_000
    for name, low, high in (("steps", 1, many), ("init_steps", 1, many), ("checkpoint_every", 1, many),
                            ("log_every", 1, many), ("warmup_steps", 0, many), ("sh_degree_every", 0, many),
                            ("map_steps", 0, many), ("init_map_steps", 0, many), ("regress_steps", 0, many),
                            ("init_regress_steps", 0, many), ("cameras_per_step", 1, 64)):
        if not low <= getattr(f, name) <= high:
            bad(f"fit.{name}", getattr(f, name), f"{low}..{high}")
    for name in ("lr", "regress_lr"):
        if not 0.0 < getattr(f, name) < 1.0:
            bad(f"fit.{name}", getattr(f, name), "in (0, 1)")
    for name, high, unit in (("lr_final", 1.0, ""), ("pose_jitter", 1.0, " radians"), ("crop_margin", 2.0, "")):
        if not 0.0 <= getattr(f, name) <= high:
            bad(f"fit.{name}", getattr(f, name), f"0..{high:g}{unit}")


def _check_diffusion(d: DiffusionConfig, bad) -> None:
    if d.tokenizer not in TOKENIZERS:
        bad("diffusion.tokenizer", d.tokenizer, spoken_list(TOKENIZERS))
    if d.normalization not in NORMALIZATIONS:
        bad("diffusion.normalization", d.normalization, spoken_list(NORMALIZATIONS))
    if d.prediction not in PREDICTIONS:
        bad("diffusion.prediction", d.prediction, spoken_list(PREDICTIONS))
    if d.projections not in PROJECTIONS:
        bad("diffusion.projections", d.projections, spoken_list(PROJECTIONS))
    for name, low, high in (("chunk_size", 1, 10_000_000), ("width", 1, 65536), ("principal_rank", 0, 65536),
                            ("blocks", 0, 1000), ("heads", 1, 1024), ("ffn", 1, 1_000_000), ("timesteps", 1, 100_000),
                            ("batch", 1, 1_000_000), ("lr_decay_every", 1, 10_000_000), ("epochs", 1, 10_000_000),
                            ("checkpoint_every", 1, 10_000_000), ("log_every", 1, 10_000_000)):
        if not low <= getattr(d, name) <= high:
            bad(f"diffusion.{name}", getattr(d, name), f"{low}..{high}")
    if d.width % d.heads:
        bad("diffusion.heads", d.heads, f"a divisor of diffusion.width ({d.width})")
    if not 1 <= d.sample_steps <= d.timesteps:
        bad("diffusion.sample_steps", d.sample_steps, f"1..{d.timesteps} (diffusion.timesteps)")
    if not 0.0 < d.beta_start <= d.beta_end < 1.0:
        bad("diffusion.beta_start/beta_end", (d.beta_start, d.beta_end), "0 < beta_start <= beta_end < 1")
    for name, low, high in (("dropout", 0.0, 0.99), ("lr_decay", 0.0, 1.0), ("ema_decay", 0.0, 1.0),
                            ("weight_decay", 0.0, 10.0), ("sample_eta", 0.0, 1.0)):
        if not low <= getattr(d, name) <= high:
            bad(f"diffusion.{name}", getattr(d, name), f"{low}..{high}")
    if not 0.0 < d.lr < 1.0:
        bad("diffusion.lr", d.lr, "in (0, 1)")
    if not 0.0 < d.norm_eps <= 1.0:
        bad("diffusion.norm_eps", d.norm_eps, "in (0, 1]")
    if d.norm_scale is not None and not 0.0 < d.norm_scale <= 1e6:
        bad("diffusion.norm_scale", d.norm_scale, "null (automatic) or in (0, 1e6]")
