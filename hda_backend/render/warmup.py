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

:func:`load_from_cache` does the same for a fit: numba's cached machine code is not the code it compiled
(the rasterizer's fastmath ``reassoc`` lets LLVM reassociate differently; README, Fitting, *Cost per
subject*), so a process that compiled the kernels and one that loaded them get gradients apart by up to
5e-4 and fits apart by 0.05 in a weight. With the kernels compiled in a child when the cache is cold,
every fit process, an interrupted one and its resume included, runs the cached code.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

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


def cold_kernels() -> list[str] | None:
    """The kernels without machine code for this CPU in numba's on-disk cache (never compiled here, or their
    sources changed since); [] when numba is missing. None when this process holds compiled kernels
    already (nothing can change what it runs) or numba's cache index cannot be read (numba internals:
    another numba version may lay it out otherwise)."""
    if importlib.util.find_spec("numba") is None:
        return []
    cold = []
    for module, names in KERNELS.items():
        for name in names:
            kernel = _kernel(module, name)
            if kernel.signatures:
                return None
            try:
                machine = kernel.targetctx.codegen().magic_tuple()
                index = kernel._cache._cache_file._load_index()  # {} when the sources changed
            except Exception:
                return None
            if not any(key[1] == machine for key in index):
                cold.append(name)
    return cold


def load_from_cache(log: Callable[[str], None] = print) -> None:
    """Make this process load every kernel from numba's cache: compile the cold ones in a child process
    first (once per machine, environment and source change; about a minute). If the child fails, this
    process compiles them itself, as it would have anyway, and says so."""
    cold = cold_kernels()
    if not cold:
        return
    log(f"compiling {len(cold)} numba kernels in a child process, once, so that every fit runs numba's "
        "cached code")
    # The child finds what this process finds: the folder holding hda_backend, then this sys.path (a fit
    # launched by the Blender add-on has its packages on a path set up at run time, not in PYTHONPATH).
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=os.pathsep.join([root] + [p for p in sys.path if p]))
    done = subprocess.run([sys.executable, "-c", "from hda_backend.render.warmup import compile_kernels; "
                           "compile_kernels()"], env=env, capture_output=True, text=True)
    still = cold_kernels()
    if done.returncode != 0 or still:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log(f"numba kernels not cached ahead ({tail[:160]}): this process compiles them")
