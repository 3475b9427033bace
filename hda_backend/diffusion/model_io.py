"""The diffusion model file format, ``DIFF.safetensors`` (written by ``hda train-diffusion``).

Tensors: the denoiser's EMA weights (``model.<key>``, float32, or in a shipped copy float16, with its per-layer
projections possibly int8) and the normaliser's statistics (``normalizer.mean``, ``normalizer.std`` [D]). An
int8 tensor ``NAME`` [R, C] has its scales in ``NAME.scale``, [R, 1] (per row) or [1, C] (per column), float16 or
float32, and is read as ``NAME`` · scale (broadcast; :mod:`.int8`). Metadata (safetensors' string map):

=================  ==========================================================================
format             "hda-diffusion"
format_version     "2" ("1": written before ``prediction`` and ``sample_eta``; still read, as x0 and η = 0)
diffusion          JSON of DiffusionConfig (tokenizer, denoiser size, schedule, prediction target, sampler)
layer_spec         the avatar UNet's layers: names, shapes, offsets in the weight vector
avatar_meta        what sampled avatars are written with (UNet and Gaussian configs, UV, body)
normalization      "coordinate" or "layer"
norm_scale         the normaliser's global factor
steps              optimiser steps trained
num_avatars        size of the training set
final_loss         the last logged loss
sources            JSON list of the training avatars' file names
half               (optional) JSON list of the groups whose float tensors are float16: "denoiser", "normalizer"
int8               (optional) JSON list of the tensors stored in int8 (each with its ``NAME.scale``)
=================  ==========================================================================

Loading checks every field and tensor and refuses a mismatch with one line naming the file and the field.
Readers get float32 whatever the file holds: int8 tensors are dequantised, float16 ones upcast.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_save_safetensors
from ..checkpoint import read_safetensors
from ..config import DiffusionConfig
from ..errors import HDAError
from . import PREDICTIONS, PROJECTIONS
from .int8 import dequantize_tensors
from .schedule import ScheduleConfig
from .transformer import DenoiserConfig, WeightDenoiser
from .weights import AvatarMeta, LayerSpec, Normalizer, WeightSet

FORMAT = "hda-diffusion"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # version 1 files lack prediction / sample_eta: the config's defaults apply
SUFFIX = ".safetensors"


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """(metadata, tensors) of a diffusion model file with its int8 tensors dequantised to float32 (the ``int8``
    field and the scales dropped; see :mod:`.int8`); otherwise unchecked. One-line HDAError if it is unreadable
    or its int8 tensors are malformed."""
    metadata, tensors = read_safetensors(path, "diffusion model")
    return dequantize_tensors(metadata, tensors, f"diffusion model {path}")


def denoiser_config(d: DiffusionConfig) -> DenoiserConfig:
    return DenoiserConfig(tokenizer=d.tokenizer, chunk_size=d.chunk_size, width=d.width, blocks=d.blocks,
                          heads=d.heads, ffn=d.ffn, dropout=d.dropout, tied=d.tied_projections,
                          principal=(d.principal_rank or d.width) if d.projections == "principal" else 0)


def schedule_config(d: DiffusionConfig) -> ScheduleConfig:
    return ScheduleConfig(timesteps=d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end)


def save_model(path: Path, ema: dict, normalizer: Normalizer, data: WeightSet, d: DiffusionConfig,
               steps: int, final_loss: float) -> None:
    """The trained model: EMA weights (``model.*``) + normaliser + metadata (JSON) for sampling."""
    tensors = {f"model.{k}": v for k, v in ema.items()}
    tensors.update(normalizer.to_tensors())
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "diffusion": json.dumps(dataclasses.asdict(d), sort_keys=True), "layer_spec": data.spec.to_json(),
                "avatar_meta": data.meta.to_json(), "normalization": normalizer.mode,
                "norm_scale": f"{normalizer.scale:.9g}", "steps": str(steps),
                "num_avatars": str(len(data.paths)), "final_loss": f"{final_loss:.6g}",
                "sources": json.dumps([p.name for p in data.paths])}
    atomic_save_safetensors(tensors, path, metadata)


@dataclass
class DiffusionModel:
    """A loaded model: the denoiser (EMA weights, eval mode) and what is needed to turn samples into avatars."""

    denoiser: WeightDenoiser
    normalizer: Normalizer
    spec: LayerSpec
    meta: AvatarMeta
    config: DiffusionConfig
    path: Path
    _composites: list | None = None  # Tokenizer.composites(), computed at the first sample
    _noise_factors: list | None = None  # Tokenizer.noise_factors(), computed at the first sample with η > 0

    def to(self, device: str | torch.device) -> "DiffusionModel":
        """Move the denoiser to ``device`` (in place; the normaliser decodes on the CPU); returns self."""
        self.denoiser.to(device)
        self._composites = None  # recomputed from the moved weights
        return self

    @property
    def schedule(self) -> ScheduleConfig:
        return schedule_config(self.config)

    @property
    def composites(self) -> list:
        if self._composites is None:
            self._composites = self.denoiser.tokenizer.composites()
        return self._composites

    @property
    def noise_factors(self) -> list:
        if self._noise_factors is None:
            self._noise_factors = self.denoiser.tokenizer.noise_factors()
        return self._noise_factors


def load_diffusion(path: str | os.PathLike) -> DiffusionModel:
    """Read and check a ``DIFF.safetensors`` written by ``hda train-diffusion``; nothing is cached."""
    path = Path(path)
    if not path.is_file():
        raise HDAError(f"diffusion model file not found: {path}")
    metadata, tensors = read_model_file(path)
    if metadata.get("format") != FORMAT:
        raise HDAError(f"diffusion model {path}: field 'format' is {metadata.get('format')!r}, expected "
                       f"'{FORMAT}'")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise HDAError(f"diffusion model {path}: field 'format_version' is {metadata.get('format_version')!r}, "
                       f"expected one of {', '.join(READABLE_VERSIONS)}")
    source = f"diffusion model {path}"
    for name in ("diffusion", "layer_spec", "avatar_meta", "normalization"):
        if name not in metadata:
            raise HDAError(f"{source}: field '{name}' is missing")
    try:
        fields = json.loads(metadata["diffusion"])
        if metadata["format_version"] == "1":  # sampled deterministically then, whatever today's default
            fields = {"prediction": "x0", "sample_eta": 0.0, **fields}
        config = DiffusionConfig(**fields)
    except (json.JSONDecodeError, TypeError):
        raise HDAError(f"{source}: field 'diffusion' is not valid JSON of a diffusion config") from None
    if config.prediction not in PREDICTIONS:
        raise HDAError(f"{source}: field 'diffusion' has prediction {config.prediction!r}, expected one of "
                       f"{', '.join(PREDICTIONS)}")
    if config.projections not in PROJECTIONS:
        raise HDAError(f"{source}: field 'diffusion' has projections {config.projections!r}, expected one of "
                       f"{', '.join(PROJECTIONS)}")
    if not 0.0 <= config.sample_eta <= 1.0:
        raise HDAError(f"{source}: field 'diffusion' has sample_eta {config.sample_eta!r}, expected 0..1")
    spec = LayerSpec.from_json(metadata["layer_spec"], source)
    meta = AvatarMeta.from_json(metadata["avatar_meta"], source)
    try:
        expected = LayerSpec.for_unet(meta.unet_config)
    except TypeError:
        raise HDAError(f"{source}: field 'avatar_meta' has unet {meta.unet}, expected width, levels, "
                       "in_channels, out_channels") from None
    if spec != expected:
        raise HDAError(f"{source}: field 'layer_spec' ({len(spec.layers)} layers, {spec.dim} values) does not match "
                       f"the avatar UNet {meta.unet} ({len(expected.layers)} layers, {expected.dim} values); the "
                       "model was trained for a different avatar architecture")
    try:
        scale = float(metadata.get("norm_scale", "1"))
    except ValueError:
        raise HDAError(f"{source}: field 'norm_scale' is {metadata['norm_scale']!r}, expected a number") from None
    normalizer = Normalizer.from_tensors(tensors, metadata["normalization"], spec.dim, source, scale)
    denoiser = WeightDenoiser(spec, denoiser_config(config))
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    expected_state = denoiser.state_dict()
    for key, ref in expected_state.items():
        if key not in state:
            raise HDAError(f"{source}: tensor 'model.{key}' is missing for a {config.tokenizer} denoiser of width "
                           f"{config.width} and {config.blocks} blocks")
        if state[key].shape != ref.shape:
            raise HDAError(f"{source}: tensor 'model.{key}' has shape {tuple(state[key].shape)}, expected "
                           f"{tuple(ref.shape)}")
        if not torch.isfinite(state[key]).all():
            raise HDAError(f"{source}: tensor 'model.{key}' contains NaN/inf")
    extra = sorted(set(state) - set(expected_state))
    if extra:
        raise HDAError(f"{source}: tensor 'model.{extra[0]}' is unexpected for this denoiser")
    denoiser.load_state_dict(state)
    denoiser.eval()
    return DiffusionModel(denoiser, normalizer, spec, meta, config, path)
