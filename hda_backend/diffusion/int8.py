"""Symmetric per-row int8 storage of weight matrices, as model files hold them.

A matrix W [R, C] is stored as q = round(W / s) [R, C] int8 in -127..127 and one scale per row s [R]:
s_r = max_c |W_rc| / 127, rounded up to the next float16 (so |W / s| <= 127 needs no clamping), or float32 for
a matrix with a row beyond float16's range. Read back as q·s, every value is within s_r / 2 of the original.

In a safetensors file the scales of tensor ``NAME`` are the tensor ``NAME.scale``, and the metadata field
``int8`` is the JSON list of the names stored this way. :func:`dequantize_tensors` checks all of it and
returns float32 matrices under their own names, so a reader sees the file as if it held float32.
"""

from __future__ import annotations

import json
import math

import torch

from ..errors import HDAError

SCALE_SUFFIX = ".scale"
FIELD = "int8"  # the metadata field listing the quantised tensors
LEVELS = 127  # symmetric: -128 stays unused, so q and -q are both representable
SCALE_DTYPES = (torch.float16, torch.float32)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [R, C] float -> (q [R, C] int8, scale [R] float16, or float32 beyond float16's range), with
    |q·scale - w| <= scale / 2 element-wise (a zero row has scale 0 and q 0)."""
    w = w.detach().to(torch.float32)
    exact = w.abs().amax(dim=1) / LEVELS
    scale = exact.half()
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    if not torch.isfinite(scale).all():
        scale = exact
    s = scale.float()
    q = torch.round(w / torch.where(s > 0, s, 1.0)[:, None]).clamp(-LEVELS, LEVELS)
    return q.to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q: [R, C] int8, scale: [R] -> [R, C] float32 = q·scale."""
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


def quantize_tensors(tensors: dict, names) -> dict:
    """tensors: name -> tensor; the 2-D tensors ``names`` replaced by their int8 values and ``NAME.scale``."""
    out = dict(tensors)
    for name in names:
        out[name], out[name + SCALE_SUFFIX] = quantize_rows(tensors[name])
    return out


def dequantize_tensors(metadata: dict, tensors: dict, source: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a file -> the same with each tensor listed in field ``int8`` read back as float32
    (its scales and the field dropped). A file without the field comes back as it is. ``source`` names the
    file in the one-line HDAError that a missing, mistyped or misshapen tensor gets."""
    names = metadata.get(FIELD)
    if names is None:
        listed = []
    else:
        try:
            listed = json.loads(names)
        except json.JSONDecodeError:
            listed = None
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise HDAError(f"{source}: field '{FIELD}' is {names[:80]!r}, expected a JSON list of tensor names")
    for name, value in tensors.items():
        if value.dtype == torch.int8 and name not in listed:
            raise HDAError(f"{source}: tensor '{name}' is int8 but field '{FIELD}' does not list it")
    out = dict(tensors)
    for name in listed:
        q, scale = tensors.get(name), tensors.get(name + SCALE_SUFFIX)
        if q is None:
            raise HDAError(f"{source}: tensor '{name}' (listed in field '{FIELD}') is missing")
        if q.dtype != torch.int8 or q.dim() != 2:
            raise HDAError(f"{source}: tensor '{name}' is {str(q.dtype)[6:]} of shape {tuple(q.shape)}, expected "
                           f"an int8 matrix (listed in field '{FIELD}')")
        if scale is None:
            raise HDAError(f"{source}: tensor '{name}{SCALE_SUFFIX}' is missing: the per-row scales of int8 "
                           f"tensor '{name}'")
        if scale.dtype not in SCALE_DTYPES or tuple(scale.shape) != (q.shape[0],):
            raise HDAError(f"{source}: tensor '{name}{SCALE_SUFFIX}' is {str(scale.dtype)[6:]} of shape "
                           f"{tuple(scale.shape)}, expected float16 or float32 of shape ({q.shape[0]},), one scale "
                           f"per row of '{name}'")
        if not (torch.isfinite(scale).all() and (scale >= 0).all()):
            raise HDAError(f"{source}: tensor '{name}{SCALE_SUFFIX}' holds a negative or non-finite scale")
        out[name] = dequantize_rows(q, out.pop(name + SCALE_SUFFIX))
    return {k: v for k, v in metadata.items() if k != FIELD}, out
