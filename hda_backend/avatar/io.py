"""The avatar file format, ``*.hda.safetensors``.

Tensors: the UNet's state dict (conv kernels ``*.weight`` [Cout,Cin,k,k] and biases ``*.bias`` [Cout],
float32). Metadata (safetensors' string map):

=================  ==========================================================================
format             "hda-avatar"
format_version     "1"
unet               JSON of UNetConfig (width, levels, in/out channels)
gaussians          JSON of GaussianConfig (decoder constants the weights were trained with)
uv_res             UV resolution the avatar was made at
body_id            identifier of the body model (e.g. "hda-open-body-v1", "SMPLX_NEUTRAL")
body_sha256        fingerprint of the body's template, faces, UVs, weights and joint regressor
origin             how it was made: "init:<seed>", "fit:<subject>", "sample:<seed>", ...
pose_input         "posed" (the UNet sees the pose) or "rest" (static baseline: plain LBS of one map)
=================  ==========================================================================

Loading checks every field and refuses a mismatch with one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from ..atomic import atomic_save_safetensors
from ..body import BodyModel
from ..errors import HDAError
from ..uvmap import UV_RESOLUTIONS
from .gaussians import GaussianConfig
from .model import Avatar
from ..constants import AVATAR_SUFFIX
from .unet import UNetConfig

FORMAT = "hda-avatar"
FORMAT_VERSION = "1"
SUFFIX = AVATAR_SUFFIX


def save_avatar(avatar: Avatar, path: str | os.PathLike, origin: str = "") -> Path:
    path = Path(path)
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "unet": json.dumps(avatar.unet.config.to_dict(), sort_keys=True),
        "gaussians": json.dumps(avatar.gaussian_config.to_dict(), sort_keys=True),
        "uv_res": str(avatar.uv_res), "body_id": avatar.body.body_id, "body_sha256": avatar.body.sha256,
        "origin": origin, "pose_input": "rest" if avatar.static else "posed",
    }
    atomic_save_safetensors(avatar.unet.state_dict(), path, metadata)
    return path


def _parse(path: Path, data: bytes) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file's bytes. The metadata is the header's ``__metadata__``
    (the format: an 8-byte little-endian header length, then the JSON header); safetensors' Python API
    reads metadata from files only, and parsing the bytes once is what keeps a file's render and its
    digest (gallery_cache) of the same bytes."""
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > len(data) - 8:
            raise ValueError(f"the header says {size} bytes, the file holds {max(0, len(data) - 8)}")
        metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, AttributeError) as exc:
        raise HDAError(f"avatar {path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if not isinstance(metadata, dict):
        raise HDAError(f"avatar {path}: not a readable safetensors file (__metadata__ is not a map)")
    return metadata, tensors


def read_avatar_file(path: str | os.PathLike, data: bytes | None = None) -> tuple[dict, dict]:
    """(metadata, tensors) of an avatar file, with the format fields checked; no body needed. data:
    the file's bytes where the caller has read them already (so that both see the same bytes)."""
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise HDAError(f"avatar file not found: {path}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise HDAError(f"avatar {path}: cannot read the file ({exc.strerror or exc})") from None
    metadata, tensors = _parse(path, data)
    if metadata.get("format") != FORMAT:
        raise HDAError(f"avatar {path}: field 'format' is {metadata.get('format')!r}, expected '{FORMAT}'")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise HDAError(f"avatar {path}: field 'format_version' is {metadata.get('format_version')!r}, "
                       f"expected '{FORMAT_VERSION}'")
    return metadata, tensors


def _config_field(path, metadata, name, cls):
    try:
        data = json.loads(metadata[name])
        return cls(**data)
    except KeyError:
        raise HDAError(f"avatar {path}: field '{name}' is missing") from None
    except (json.JSONDecodeError, TypeError) as exc:
        names = ", ".join(f.name for f in dataclasses.fields(cls))
        raise HDAError(f"avatar {path}: field '{name}' is not valid ({exc}), expected JSON with {names}") from None


def load_avatar(path: str | os.PathLike, body: BodyModel, data: bytes | None = None) -> Avatar:
    """Load an avatar and check it against ``body`` (the body it was made for). data: the file's
    bytes where the caller has read them already."""
    path = Path(path)
    metadata, tensors = read_avatar_file(path, data)
    unet_config = _config_field(path, metadata, "unet", UNetConfig)
    gaussian_config = _config_field(path, metadata, "gaussians", GaussianConfig)
    try:
        uv_res = int(metadata.get("uv_res", ""))
    except ValueError:
        uv_res = -1
    if uv_res not in UV_RESOLUTIONS or uv_res % (2 ** unet_config.levels):
        raise HDAError(f"avatar {path}: field 'uv_res' is {metadata.get('uv_res')!r}, expected one of "
                       f"{UV_RESOLUTIONS} divisible by 2**levels")
    if metadata.get("body_sha256") != body.sha256:
        raise HDAError(f"avatar {path}: field 'body_sha256' says it was made for body "
                       f"'{metadata.get('body_id')}' ({str(metadata.get('body_sha256'))[:12]}), but the loaded body is "
                       f"'{body.body_id}' ({body.sha256[:12]}); point body.path / HDA_SMPLX_PATH at that body")
    if (unet_config.in_channels, unet_config.out_channels) != (6, 59) or not 1 <= unet_config.width <= 1024:
        raise HDAError(f"avatar {path}: field 'unet' is {metadata['unet']}, expected 6 in / 59 out channels")
    pose_input = metadata.get("pose_input", "posed")
    if pose_input not in ("posed", "rest"):
        raise HDAError(f"avatar {path}: field 'pose_input' is {pose_input!r}, expected 'posed' or 'rest'")
    avatar = Avatar(body, uv_res, unet_config, gaussian_config, static=pose_input == "rest")
    expected = avatar.unet.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        name = (missing or extra)[0]
        raise HDAError(f"avatar {path}: tensor '{name}' is {'missing' if missing else 'unexpected'} "
                       f"for a UNet of width {unet_config.width} and {unet_config.levels} levels")
    for key, ref in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise HDAError(f"avatar {path}: tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise HDAError(f"avatar {path}: tensor '{key}' contains NaN/inf or is not floating point")
    avatar.unet.load_state_dict({k: v.float() for k, v in tensors.items()})
    return avatar
