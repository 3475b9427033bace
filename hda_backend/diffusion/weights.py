"""Avatar weights as data: a set of fitted UNets as one matrix ``vectors [N, D]`` (paper Eq. 10).

An avatar's weights are its conv layers in ``AvatarUNet.conv_layers()`` order; each layer contributes one
contiguous *token* of the flattened kernel followed by its bias. :class:`LayerSpec` records where each
token lives in the flat vector, so vectors, state dicts and avatar files convert exactly into each other.

:class:`Normalizer` standardises vectors before diffusion. The paper standardises "to zero mean and unit
variance" without saying over what. The mean is always the mean avatar (per coordinate): a scalar mean per
layer leaves the denoiser to reproduce the shared network itself, and its error then swamps the differences
between subjects (measured). The std is per coordinate or pooled per layer, and a global factor may follow.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_save_safetensors
from ..avatar.io import FORMAT, FORMAT_VERSION, SUFFIX, read_avatar_file
from ..avatar.unet import AvatarUNet, UNetConfig
from ..errors import HDAError
from ..uvmap import UV_RESOLUTIONS
from . import NORMALIZATIONS

MAX_AVATARS = 100_000


@dataclass(frozen=True)
class LayerEntry:
    """One conv layer: state-dict prefix, kernel [Cout,Cin,k,k] and bias [Cout] shapes, place in the vector."""

    name: str
    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...]
    offset: int
    length: int  # prod(kernel_shape) + prod(bias_shape)

    @property
    def kernel_size(self) -> int:
        return _prod(self.kernel_shape)


@dataclass(frozen=True)
class LayerSpec:
    """The token layout of a weight vector: one :class:`LayerEntry` per conv layer, in forward order."""

    layers: tuple[LayerEntry, ...]

    @property
    def dim(self) -> int:
        return sum(layer.length for layer in self.layers)

    @property
    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]

    def to_json(self) -> str:
        return json.dumps([asdict(layer) for layer in self.layers])

    @classmethod
    def from_json(cls, text: str, source: str = "layer spec") -> "LayerSpec":
        try:
            rows = json.loads(text)
            layers = tuple(LayerEntry(name=str(r["name"]), kernel_shape=tuple(int(x) for x in r["kernel_shape"]),
                                      bias_shape=tuple(int(x) for x in r["bias_shape"]), offset=int(r["offset"]),
                                      length=int(r["length"])) for r in rows)
        except (json.JSONDecodeError, TypeError, KeyError, ValueError):
            raise HDAError(f"{source}: field 'layer_spec' is not valid JSON of layers "
                           "(name, kernel_shape, bias_shape, offset, length)") from None
        spec = cls(layers)
        offset = 0
        for layer in layers:
            if layer.offset != offset or layer.length != layer.kernel_size + _prod(layer.bias_shape):
                raise HDAError(f"{source}: field 'layer_spec' layer '{layer.name}' has offset {layer.offset} / "
                               f"length {layer.length}, expected {offset} / "
                               f"{layer.kernel_size + _prod(layer.bias_shape)}")
            offset += layer.length
        return spec

    @classmethod
    def for_unet(cls, config: UNetConfig) -> "LayerSpec":
        """The layout of an :class:`AvatarUNet` with this config (built on the meta device: no memory)."""
        with torch.device("meta"):
            unet = AvatarUNet(config)
        layers, offset = [], 0
        for name, conv in unet.conv_layers():
            kernel, bias = tuple(conv.weight.shape), tuple(conv.bias.shape)
            length = _prod(kernel) + _prod(bias)
            layers.append(LayerEntry(name, kernel, bias, offset, length))
            offset += length
        return cls(tuple(layers))


@dataclass(frozen=True)
class AvatarMeta:
    """What every avatar of a weight set shares, and what a sampled avatar file is written with."""

    unet: dict  # UNetConfig as a dict
    gaussians: dict  # GaussianConfig as a dict
    uv_res: int
    body_id: str
    body_sha256: str
    pose_input: str  # "posed" | "rest"

    @property
    def unet_config(self) -> UNetConfig:
        return UNetConfig(**self.unet)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "avatar metadata") -> "AvatarMeta":
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError):
            raise HDAError(f"{source}: field 'avatar_meta' is not valid JSON with unet, gaussians, uv_res, "
                           "body_id, body_sha256, pose_input") from None


@dataclass
class WeightSet:
    """N avatars as data. vectors: [N, D] float32, rows in the order of ``paths``."""

    vectors: torch.Tensor
    spec: LayerSpec
    meta: AvatarMeta
    paths: list[Path]


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _avatar_paths(source) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        if source.is_dir():
            paths = sorted(source.glob(f"*{SUFFIX}"))
            if not paths:
                raise HDAError(f"folder {source}: no avatar files (*{SUFFIX}) found")
            return paths
        if not source.exists():
            raise HDAError(f"avatar folder or file not found: {source}")
        return [source]
    paths = [Path(p) for p in source]
    if not paths:
        raise HDAError("avatar list: empty, expected at least one *.hda.safetensors file")
    return paths


def _meta_of(path: Path, metadata: dict) -> AvatarMeta:
    def parsed(name):
        try:
            value = json.loads(metadata[name])
        except KeyError:
            raise HDAError(f"avatar {path}: field '{name}' is missing") from None
        except json.JSONDecodeError:
            raise HDAError(f"avatar {path}: field '{name}' is not valid JSON") from None
        if not isinstance(value, dict):
            raise HDAError(f"avatar {path}: field '{name}' is {metadata[name]!r}, expected a JSON object")
        return value

    unet = parsed("unet")
    try:
        config = UNetConfig(**unet)
    except TypeError:
        raise HDAError(f"avatar {path}: field 'unet' is {metadata['unet']}, expected JSON with width, levels, "
                       "in_channels, out_channels") from None
    if (config.in_channels, config.out_channels) != (6, 59) or not 1 <= config.width <= 1024 \
            or not 1 <= config.levels <= 6:
        raise HDAError(f"avatar {path}: field 'unet' is {metadata['unet']}, expected 6 in / 59 out channels, "
                       "width 1..1024, levels 1..6")
    try:
        uv_res = int(metadata.get("uv_res", ""))
    except ValueError:
        uv_res = -1
    if uv_res not in UV_RESOLUTIONS:
        raise HDAError(f"avatar {path}: field 'uv_res' is {metadata.get('uv_res')!r}, expected one of {UV_RESOLUTIONS}")
    pose_input = metadata.get("pose_input", "posed")
    if pose_input not in ("posed", "rest"):
        raise HDAError(f"avatar {path}: field 'pose_input' is {pose_input!r}, expected 'posed' or 'rest'")
    for name in ("body_id", "body_sha256"):
        if not metadata.get(name):
            raise HDAError(f"avatar {path}: field '{name}' is missing")
    return AvatarMeta(unet=config.to_dict(), gaussians=parsed("gaussians"), uv_res=uv_res,
                      body_id=metadata["body_id"], body_sha256=metadata["body_sha256"], pose_input=pose_input)


def state_dict_to_vector(tensors: dict, spec: LayerSpec, source: str = "state dict") -> torch.Tensor:
    """{"<layer>.weight": [Cout,Cin,k,k], "<layer>.bias": [Cout]} -> [D] float32 (kernel ⊕ bias per layer)."""
    expected = {f"{layer.name}.{part}" for layer in spec.layers for part in ("weight", "bias")}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise HDAError(f"{source}: tensor '{(missing or extra)[0]}' is {'missing' if missing else 'unexpected'} "
                       f"for the layer spec of {len(spec.layers)} conv layers")
    parts = []
    for layer in spec.layers:
        for part, shape in (("weight", layer.kernel_shape), ("bias", layer.bias_shape)):
            t = tensors[f"{layer.name}.{part}"]
            if tuple(t.shape) != shape:
                raise HDAError(f"{source}: tensor '{layer.name}.{part}' has shape {tuple(t.shape)}, expected {shape}")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise HDAError(f"{source}: tensor '{layer.name}.{part}' contains NaN/inf or is not floating point")
            parts.append(t.detach().reshape(-1).to(torch.float32))
    return torch.cat(parts)


def vector_to_state_dict(vec: torch.Tensor, spec: LayerSpec) -> dict:
    """vec: [D] -> {"<layer>.weight": [Cout,Cin,k,k], "<layer>.bias": [Cout]} (views into ``vec``)."""
    if vec.ndim != 1 or vec.shape[0] != spec.dim:
        raise HDAError(f"weight vector: shape {tuple(vec.shape)}, expected ({spec.dim},) for this layer spec")
    out = {}
    for layer in spec.layers:
        token = vec[layer.offset:layer.offset + layer.length]
        out[f"{layer.name}.weight"] = token[:layer.kernel_size].reshape(layer.kernel_shape)
        out[f"{layer.name}.bias"] = token[layer.kernel_size:].reshape(layer.bias_shape)
    return out


def load_weight_set(source) -> WeightSet:
    """Read avatar files (a folder of ``*.hda.safetensors``, one file, or a list of paths) into a WeightSet.

    Every file must share the first one's UNet architecture, Gaussian decoder config, UV resolution, body
    fingerprint and pose input, and hold finite weights; otherwise one line names the file and field.
    """
    paths = _avatar_paths(source)
    if len(paths) > MAX_AVATARS:
        raise HDAError(f"avatar list: {len(paths)} files, expected at most {MAX_AVATARS}")
    first_meta, spec, rows = None, None, []
    for path in paths:
        metadata, tensors = read_avatar_file(path)
        meta = _meta_of(path, metadata)
        if first_meta is None:
            first_meta, spec = meta, LayerSpec.for_unet(meta.unet_config)
        else:
            for name in ("unet", "gaussians", "uv_res", "body_sha256", "pose_input"):
                if getattr(meta, name) != getattr(first_meta, name):
                    raise HDAError(f"avatar {path}: field '{name}' is {getattr(meta, name)!r}, expected "
                                   f"{getattr(first_meta, name)!r} as in {paths[0].name} (one weight set, one "
                                   "architecture)")
        rows.append(state_dict_to_vector(tensors, spec, f"avatar {path}"))
    return WeightSet(vectors=torch.stack(rows), spec=spec, meta=first_meta, paths=paths)


def write_avatar(vec: torch.Tensor, spec: LayerSpec, meta: AvatarMeta, path, origin: str = "") -> Path:
    """vec: [D] float32 -> an ordinary avatar file (what ``hda render`` and Blender load), written atomically."""
    path = Path(path)
    if not path.name.endswith(SUFFIX):
        raise HDAError(f"avatar {path}: expected a file name ending in {SUFFIX}")
    if not torch.isfinite(vec).all():
        raise HDAError(f"avatar {path}: the weight vector contains NaN/inf; refusing to write it")
    if LayerSpec.for_unet(meta.unet_config) != spec:
        raise HDAError(f"avatar {path}: the layer spec does not match field 'unet' {meta.unet}")
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "unet": json.dumps(meta.unet, sort_keys=True), "gaussians": json.dumps(meta.gaussians, sort_keys=True),
        "uv_res": str(meta.uv_res), "body_id": meta.body_id, "body_sha256": meta.body_sha256,
        "origin": origin, "pose_input": meta.pose_input,
    }
    tensors = {k: v.clone() for k, v in vector_to_state_dict(vec.detach().to(torch.float32).cpu(), spec).items()}
    atomic_save_safetensors(tensors, path, metadata)
    return path




@dataclass
class Normalizer:
    """x_norm = (x - mean) / std, both [D]: the mean avatar, and the spread across the set per coordinate
    ("coordinate") or pooled over each layer ("layer"), divided by ``scale``.

    The std has a floor of ``eps`` times the layer's pooled spread, so a coordinate that barely varies across
    the set (or a set of one) is not blown up into pure noise; a layer with no spread at all keeps std 1.
    """

    mode: str
    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D], the scale included
    scale: float = 1.0

    @classmethod
    def fit(cls, vectors: torch.Tensor, spec: LayerSpec, mode: str = "coordinate", eps: float = 1e-3,
            scale: float = 1.0) -> "Normalizer":
        """vectors: [N, D] -> statistics over the N rows; the standardised values are multiplied by ``scale``."""
        if mode not in NORMALIZATIONS:
            raise HDAError(f"normalization {mode!r}: expected one of {', '.join(NORMALIZATIONS)}")
        mean, std = torch.empty(spec.dim, dtype=torch.float64), torch.empty(spec.dim, dtype=torch.float64)
        for layer in spec.layers:
            s = slice(layer.offset, layer.offset + layer.length)
            block = vectors[:, s].to(torch.float64)  # a layer at a time: N x D in float64 can be GBs
            m = block.mean(0)
            var = (block - m).pow(2).mean(0)
            pooled = var.mean().sqrt()
            sd = var.sqrt() if mode == "coordinate" else pooled.expand(layer.length)
            mean[s] = m
            std[s] = torch.maximum(sd, eps * pooled) if pooled > 0 else 1.0
        return cls(mode, mean.to(torch.float32), (std / scale).to(torch.float32), scale)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] weights -> [..., D] standardised."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [..., D] standardised -> [..., D] weights."""
        return z * self.std.to(z.device) + self.mean.to(z.device)

    def to_tensors(self) -> dict:
        return {"normalizer.mean": self.mean, "normalizer.std": self.std}

    @classmethod
    def from_tensors(cls, tensors: dict, mode: str, dim: int, source: str = "checkpoint",
                     scale: float = 1.0) -> "Normalizer":
        if mode not in NORMALIZATIONS:
            raise HDAError(f"{source}: field 'normalization' is {mode!r}, expected one of {', '.join(NORMALIZATIONS)}")
        try:
            mean, std = tensors["normalizer.mean"].float(), tensors["normalizer.std"].float()
        except KeyError as exc:
            raise HDAError(f"{source}: tensor {exc} is missing") from None
        if mean.shape != (dim,) or std.shape != (dim,):
            raise HDAError(f"{source}: tensor 'normalizer.mean'/'normalizer.std' has shape {tuple(mean.shape)}, "
                           f"expected ({dim},)")
        if not torch.isfinite(mean).all() or not torch.isfinite(std).all() or not (std > 0).all():
            raise HDAError(f"{source}: tensor 'normalizer.std' is not finite and positive")
        return cls(mode, mean, std, scale)
