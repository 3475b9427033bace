"""Symmetric int8 storage of weight matrices with one scale per row or per column, as model files hold them.

A matrix W [R, C] is stored as q = round(W / s) [R, C] int8 in -127..127 and scales s of shape [R, 1] (per row)
or [1, C] (per column): s = max |W| / 127 over the row (column), rounded up to the next float16 (so |W / s| <= 127
needs no clamping), or float32 for a matrix with a row (column) beyond float16's range. Read back as q·s
(broadcast), every value is within s / 2 of the original.

In a safetensors file the scales of tensor ``NAME`` are the tensor ``NAME.scale`` (its shape says which axis),
and the metadata field ``int8`` is the JSON list of the names stored this way. :func:`dequantize_tensors`
checks all of it and returns float32 matrices under their own names, so a reader sees them as float32.
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
AXES = {"row": 1, "column": 0}  # the axis each kind of scale takes its maximum over


def quantize(w: torch.Tensor, per: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """w: [R, C] float -> (q [R, C] int8, scale [R, 1] for ``per="row"`` or [1, C] for ``per="column"``, float16,
    or float32 beyond float16's range), with |q·scale - w| <= scale / 2 element-wise (a zero row or column has
    scale 0 and q 0)."""
    w = w.detach().to(torch.float32)
    exact = w.abs().amax(dim=AXES[per], keepdim=True) / LEVELS
    scale = exact.half()
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    if not torch.isfinite(scale).all():
        scale = exact
    s = scale.float()
    q = torch.round(w / torch.where(s > 0, s, 1.0)).clamp(-LEVELS, LEVELS)
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q: [R, C] int8, scale: [R, 1] or [1, C] -> [R, C] float32 = q·scale."""
    return q.to(torch.float32) * scale.to(torch.float32)


def quantize_tensors(tensors: dict, axes: dict) -> dict:
    """tensors: name -> tensor; axes: name -> "row" | "column": those 2-D tensors replaced by their int8 values
    and ``NAME.scale``."""
    out = dict(tensors)
    for name, per in axes.items():
        out[name], out[name + SCALE_SUFFIX] = quantize(tensors[name], per)
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
            raise HDAError(f"{source}: tensor '{name}{SCALE_SUFFIX}' is missing: the scales of int8 "
                           f"tensor '{name}'")
        rows, columns = q.shape
        if scale.dtype not in SCALE_DTYPES or tuple(scale.shape) not in ((rows, 1), (1, columns)):
            raise HDAError(f"{source}: tensor '{name}{SCALE_SUFFIX}' is {str(scale.dtype)[6:]} of shape "
                           f"{tuple(scale.shape)}, expected float16 or float32 of shape ({rows}, 1) or (1, {columns}), "
                           f"one scale per row or per column of '{name}'")
        if not (torch.isfinite(scale).all() and (scale >= 0).all()):
            raise HDAError(f"{source}: tensor '{name}{SCALE_SUFFIX}' holds a negative or non-finite scale")
        out[name] = dequantize(q, out.pop(name + SCALE_SUFFIX))
    return {k: v for k, v in metadata.items() if k != FIELD}, out
