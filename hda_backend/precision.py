"""Arithmetic precision of the UNet: bfloat16 autocast where the hardware runs it natively, else float32.

bf16 autocast runs the width-64 UNet about 3x faster on CPUs with AVX-512 BF16 or AMX, and gains nothing
(or loses) on CPUs without, so ``auto`` asks the hardware at run time: oneDNN's own bf16 check on the
CPU, ``torch.cuda.is_bf16_supported`` on CUDA. Only the UNet runs under autocast; skinning, decoding,
rasterization and losses stay float32 (see ``tests/test_precision.py`` for the closeness check).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .errors import HDAError

PRECISIONS = ("auto", "float32", "bfloat16")


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bf16 matrix maths natively (AVX-512 BF16 / AMX on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bfloat16`` where :func:`bf16_native`, else ``float32``; the others are kept."""
    if precision not in PRECISIONS:
        raise HDAError(f"precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if bf16_native(device) else "float32"
    return precision


def autocast(precision: str, device: torch.device | str = "cpu") -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context in which to run the UNet for a resolved ``precision``."""
    device = torch.device(device)
    if precision == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
