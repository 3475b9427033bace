"""Smaller copies of diffusion models and avatars for shipping, kept small only where the renders keep.

A model's tensors fall into two groups: the denoiser (``model.*``) and the normaliser's statistics
(``normalizer.*``: the mean avatar and the per-coordinate spread). Each group in turn is tried in the
precisions of :data:`LADDERS`, smallest first, and the first whose samples render like those of the float32
model is kept (float32 if none does): the worst PSNR between the two renders of the same seed, over every
gallery view, must reach the threshold of the lossiest precision in the file so far. Only the seeds whose
float32 samples are plausible people (:func:`.plausibility.check_plausible`) are judged, all of them if none
is: an implausible sample, e.g. a Gaussian blown across the frame, turns a weight change that leaves every
person alone into a large render difference (the 224-subject build's int8 trial: seven seeds at 62-69 dB, the
implausible one at 32 dB; README, *Default model*), so it would decide the trial without being a person.

- float16: ``min_psnr_db``, 50 dB by default, where nothing measurable changes.
- int8 (the denoiser only): the tokenizer's per-layer projections, nearly all of a layer-token denoiser's
  values, stored as int8 with one scale per avatar weight (:mod:`.int8`): per row of an output projection
  W_out [n, width] and per column of an input projection W_in [width, n], the row or column that writes or
  reads that weight (per row of W_in, a scale spans a whole layer, and the bundled model's worst render fell
  from 50.4 to 44.1 dB); the denoiser's other tensors in float16. It halves the file again, so that a
  width-48 denoiser fits the 64 MB bundle (README, *Default model*), and is kept at ``int8_min_psnr_db``,
  40 dB by default: 14 dB above the ~26 dB that separates two different people in ``hda eval-gen`` (an
  error with 1/25 of their squared difference), and above the 35 dB under which the bundled model's tests
  call two renders different people.

The loaders read every precision back as float32, so a compact file is read like any other.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_save_safetensors
from ..avatar.io import SUFFIX, load_avatar, read_avatar_file
from ..body import BodyModel
from ..errors import HDAError
from .gallery import GalleryConfig, gallery_views, mse_matrix, psnr_distance, render_avatar, render_gallery
from .int8 import FIELD as INT8_FIELD
from .int8 import quantize_tensors
from .model_io import load_diffusion, read_model_file
from .plausibility import PlausibilityConfig, body_silhouettes, check_plausible
from .sample import sample_vectors
from .weights import write_avatar

GROUPS = {"denoiser": "model.", "normalizer": "normalizer."}
# What each group may be stored in, smallest first (float32 when none keeps the renders).
LADDERS = {"denoiser": ("int8", "float16"), "normalizer": ("float16",)}
# The tensors that int8 stores, and the axis of their scales: the tokenizer's per-layer projections (99.8 % of
# a cpu-preset denoiser's values at width 24 and 48; the transformer's own matrices are a few thousand values
# each), with one scale per avatar weight (module docstring).
INT8_AXES = {"model.tokenizer.proj_in.": "column", "model.tokenizer.proj_out.": "row"}


@dataclass(frozen=True)
class CompactConfig:
    seeds: tuple = (0, 1, 2, 3, 4, 5, 6, 7)  # identities compared between the float32 and the smaller model
    plausibility: PlausibilityConfig = field(default_factory=PlausibilityConfig)  # which of them are judged
    min_psnr_db: float = 50.0  # worst render PSNR (any judged seed, any view) for a group to stay in float16
    int8_min_psnr_db: float = 40.0  # the same for the denoiser's projections in int8 (module docstring)
    gallery: GalleryConfig = field(default_factory=lambda: GalleryConfig(size=128))

    def to_dict(self) -> dict:
        return asdict(self)


def half_tensors(tensors: dict, groups: tuple[str, ...]) -> dict:
    """tensors: name -> tensor; the float tensors of the named groups (see :data:`GROUPS`) cast to float16."""
    prefixes = tuple(GROUPS[g] for g in groups)
    return {k: v.half() if v.is_floating_point() and k.startswith(prefixes) else v for k, v in tensors.items()}


def int8_axes(tensors: dict) -> dict:
    """name -> "row" | "column": the tensors that the denoiser's int8 precision stores as int8 (:data:`INT8_AXES`)."""
    return {k: per for k, v in tensors.items() for prefix, per in INT8_AXES.items()
            if k.startswith(prefix) and v.is_floating_point() and v.dim() == 2}


def compact_tensors(tensors: dict, precisions: dict) -> tuple[dict, dict]:
    """tensors: name -> float32 tensor; precisions: group -> "float16" | "int8" (a group not named stays
    float32) -> (the tensors to write, the metadata fields ``half`` and, with int8, ``int8``)."""
    half = tuple(g for g in GROUPS if precisions.get(g) in ("float16", "int8"))
    axes = int8_axes(tensors) if precisions.get("denoiser") == "int8" else {}
    out = half_tensors(tensors, half)
    out.update(quantize_tensors({k: tensors[k] for k in axes}, axes))  # from float32, not from the half copies
    fields = {"half": json.dumps(list(half))}
    if axes:
        fields[INT8_FIELD] = json.dumps(list(axes))
    return out, fields


def threshold_db(precisions: dict, config: CompactConfig) -> float:
    """The worst render PSNR a file with these group precisions must keep: that of its lossiest precision."""
    return config.int8_min_psnr_db if "int8" in precisions.values() else config.min_psnr_db


def _worst_view_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst PSNR (dB) over the views of two renders of one avatar each, a and b [V,H,W,3]."""
    return min(-float(psnr_distance(mse_matrix(a[None, v:v + 1], b[None, v:v + 1]))[0, 0]) for v in range(a.shape[0]))


def _render_psnr(path_a: Path, path_b: Path, body: BodyModel, views) -> float:
    """Worst PSNR (dB) over the gallery views between the renders of two avatar files."""
    images = render_gallery((load_avatar(p, body) for p in (path_a, path_b)), views).images
    return _worst_view_psnr(images[0], images[1])


def judged_seeds(avatars: list, alpha: torch.Tensor, body: BodyModel, views, config: CompactConfig) -> list[int]:
    """Indices of the float32 samples (avatars, one per seed, with their gallery alpha [S,V,H,W]) that pass
    the plausibility checks; every index when none does (module docstring)."""
    masks = body_silhouettes(body, views)
    plausible = [i for i, avatar in enumerate(avatars)
                 if check_plausible(avatar, views, config.plausibility, alpha=alpha[i], body_masks=masks).ok]
    return plausible or list(range(len(avatars)))


def compact_model(src, dst, body: BodyModel, config: CompactConfig = CompactConfig()) -> dict:
    """Write ``dst``: the model ``src`` with each tensor group as small as its renders allow (see the module
    docstring). Returns {"precisions": group -> "int8" | "float16" (float32 groups absent), "half": the
    groups whose float tensors are float16, "int8": the int8 tensors, "trials": [{"groups", "precisions",
    "worst_psnr_db" (over the judged seeds), "seed_psnr_db" (every seed's worst view), "min_psnr_db"}],
    "judged_seeds", "bytes", "config"}."""
    src, dst = Path(src), Path(dst)
    reference = load_diffusion(src)
    metadata, tensors = read_model_file(src)
    views = gallery_views(body, config.gallery)
    want = sample_vectors(reference, list(config.seeds))
    kept: dict[str, str] = {}
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def as_avatar(vector):  # through a file, as a sample is saved and loaded
            return load_avatar(write_avatar(vector, reference.spec, reference.meta, tmp / f"sample{SUFFIX}"), body)

        # The float32 samples are rendered once: every trial compares with these renders.
        wanted = [as_avatar(v) for v in want]
        wanted_renders = render_gallery(wanted, views)
        judged = judged_seeds(wanted, wanted_renders.alpha, body, views, config)
        for group, ladder in LADDERS.items():
            for precision in ladder:
                trial = {**kept, group: precision}
                candidate = tmp / "candidate.safetensors"
                written, fields = compact_tensors(tensors, trial)
                atomic_save_safetensors(written, candidate, {**metadata, **fields})
                got = sample_vectors(load_diffusion(candidate), list(config.seeds))
                per_seed = [_worst_view_psnr(wanted_renders.images[i], render_avatar(as_avatar(v), views)[0])
                            for i, v in enumerate(got)]
                worst = min(per_seed[i] for i in judged)
                needed = threshold_db(trial, config)
                trials.append({"groups": list(trial), "precisions": trial, "worst_psnr_db": round(worst, 2),
                               "seed_psnr_db": [round(x, 2) for x in per_seed], "min_psnr_db": needed})
                if worst >= needed:
                    kept = trial
                    break
    written, fields = compact_tensors(tensors, kept)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(written, dst, {**metadata, **fields})
    return {"precisions": kept, "half": json.loads(fields["half"]), "int8": json.loads(fields.get(INT8_FIELD, "[]")),
            "trials": trials, "judged_seeds": [config.seeds[i] for i in judged], "bytes": dst.stat().st_size,
            "config": config.to_dict()}


def compact_avatar(src, dst, body: BodyModel, config: CompactConfig = CompactConfig()) -> dict:
    """Write ``dst``: the avatar ``src`` in float16 if its renders keep ``min_psnr_db``, else as it is.
    Returns {"half": bool, "worst_psnr_db", "bytes"}."""
    src, dst = Path(src), Path(dst)
    if not dst.name.endswith(SUFFIX):
        raise HDAError(f"avatar {dst}: expected a file name ending in {SUFFIX}")
    metadata, tensors = read_avatar_file(src)
    views = gallery_views(body, config.gallery)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / f"half{SUFFIX}"
        halved = {k: v.half() for k, v in tensors.items()}
        atomic_save_safetensors(halved, candidate, metadata)
        worst = _render_psnr(src, candidate, body, views)
        half = worst >= config.min_psnr_db
        atomic_save_safetensors(halved if half else tensors, dst, metadata)
    return {"half": half, "worst_psnr_db": round(worst, 2), "bytes": dst.stat().st_size}
