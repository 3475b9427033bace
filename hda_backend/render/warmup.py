"""Compile the project's numba kernels ahead of their first use.

numba compiles a kernel the first time it is called with new argument types and keeps the machine
code in its on-disk cache (``cache=True``: ``__pycache__`` beside each kernel's module, or
``$NUMBA_CACHE_DIR``); a later process loads it in a fraction of a second instead of compiling again.
:func:`compile_kernels` calls each kernel once with the argument types real calls use: the rasterizer
forward with depth and the fused projection (what a frame render calls), the rasterizer's and the
projection's backward (what fitting calls), and the per-frame fast path's UV-map and decoding kernels
on a tiny avatar (what the add-on's frames call), so that every kernel is compiled and cached. The
Blender add-on runs it in a child process when it is enabled (blender_addon/kernels.py), so the first
render after installing does not wait for the compiler.
"""

from __future__ import annotations

import importlib

# The kernels called from Python, by module (the others, such as _argsort_depths, are compiled into
# their callers).
KERNELS = {
    "hda_backend.render._raster_numba": ("_bin_tiles", "_forward", "_backward", "_scatter_add"),
    "hda_backend.render._projection_numba": ("_project", "_project_backward"),
    "hda_backend.avatar._realtime_numba": ("_pose_maps", "_decode"),
}
STAGES = ("forward kernels", "backward kernels", "avatar kernels")


def compile_kernels(progress=None) -> None:
    """Compile (or load from numba's cache) every kernel. ``progress(done, total, stage)`` is called
    before each stage and once at the end (done == total)."""
    import torch

    from ..avatar.model import Avatar
    from ..avatar.realtime import RealtimeAvatar
    from ..avatar.unet import UNetConfig
    from ..body import load_body
    from ..config import load_config
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
    report(2, len(STAGES), STAGES[2])
    # A small avatar of the bundled body: its kernels' argument types are every avatar's.
    avatar = Avatar.from_init(load_body(), 32, UNetConfig(8, 1), load_config("tiny").gaussians, seed=0)
    with torch.inference_mode():
        RealtimeAvatar(avatar, "float32")(torch.zeros(1, 55, 3))
    report(len(STAGES), len(STAGES), "done")


def _kernel(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def compiled_signatures() -> dict[str, int]:
    """{kernel: number of argument-type signatures compiled or loaded in this process}."""
    return {name: len(_kernel(module, name).signatures) for module, names in KERNELS.items() for name in names}


def cache_stats() -> dict[str, tuple[int, int]]:
    """{kernel: (cache hits, cache misses)} of this process: a miss is a compilation."""
    out = {}
    for module, names in KERNELS.items():
        for name in names:
            stats = _kernel(module, name).stats
            out[name] = (sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
    return out
