"""Compile the CPU rasterizer's numba kernels ahead of their first use.

numba compiles a kernel the first time it is called with new argument types and keeps the machine
code in its on-disk cache (``cache=True``: ``__pycache__`` beside ``_raster_numba.py``, or
``$NUMBA_CACHE_DIR``); a later process loads it in a fraction of a second instead of compiling again.
:func:`compile_kernels` runs the rasterizer once, forward with depth (what a frame render calls) and
backward (what fitting calls), on a tiny scene with the argument types real calls use, so that every
kernel is compiled and cached. The Blender add-on runs it in a child process when it is enabled
(blender_addon/kernels.py), so the first render after installing does not wait for the compiler.
"""

from __future__ import annotations

# The kernels called from Python (the others, such as _argsort_depths, are compiled into their callers).
KERNELS = ("_bin_tiles", "_forward", "_backward", "_scatter_add")
STAGES = ("forward kernels", "backward kernels")


def compile_kernels(progress=None) -> None:
    """Compile (or load from numba's cache) every raster kernel. ``progress(done, total, stage)`` is
    called before each stage and once at the end (done == total)."""
    import torch

    from .rasterize import rasterize

    report = progress or (lambda done, total, stage: None)
    g = torch.Generator().manual_seed(0)
    n = 64
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([1.0, 1.0, 0.2]) + torch.tensor([0.0, 0.0, 3.0])
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.full((n, 3), 0.05)
    opacities = torch.full((n,), 0.8)
    colors = torch.rand(n, 3, generator=g)
    viewmats = torch.eye(4)[None]
    Ks = torch.tensor([[[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]]])
    report(0, len(STAGES), STAGES[0])
    with torch.no_grad():
        rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 32, 32, render_mode="RGB+ED", backend="cpu")
    report(1, len(STAGES), STAGES[1])
    means.requires_grad_(True)
    image, alpha, _ = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 32, 32, backend="cpu")
    (image.sum() + alpha.sum()).backward()
    report(len(STAGES), len(STAGES), "done")


def compiled_signatures() -> dict[str, int]:
    """{kernel: number of argument-type signatures compiled or loaded in this process}."""
    from . import _raster_numba

    return {name: len(getattr(_raster_numba, name).signatures) for name in KERNELS}


def cache_stats() -> dict[str, tuple[int, int]]:
    """{kernel: (cache hits, cache misses)} of this process: a miss is a compilation."""
    from . import _raster_numba

    out = {}
    for name in KERNELS:
        stats = getattr(_raster_numba, name).stats
        out[name] = (sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
    return out
