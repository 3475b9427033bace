"""`hda bench raster`: time `rasterize` on avatar-like scenes.

A scene is N Gaussians scattered on the surface of a 1.7 m tall stick figure (torso, head, arms, legs made
of cylinders and a sphere), scales 5–15 mm, opacities 0.5–1, SH degree 3, seen from 3 m by a camera whose
frame is 2 m tall, so the figure's bounding box covers about a third of the image.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from ..errors import HDAError
from .rasterize import _numba_raster, rasterize

# (centre x, y, z), radius, half length along the vertical axis; a radius with zero length is a sphere.
_BODY_PARTS = (
    ((0.0, 1.15, 0.0), 0.16, 0.30),  # torso
    ((0.0, 1.58, 0.0), 0.11, 0.0),  # head
    ((-0.09, 0.43, 0.0), 0.08, 0.43),  # legs
    ((0.09, 0.43, 0.0), 0.08, 0.43),
    ((-0.30, 1.12, 0.0), 0.05, 0.30),  # arms, slightly away from the torso
    ((0.30, 1.12, 0.0), 0.05, 0.30),
)


def avatar_scene(n: int, size: int, seed: int = 0, sh_degree: int = 3) -> dict:
    """Keyword arguments of `rasterize` for an avatar-like scene of n Gaussians in one size×size camera."""
    gen = torch.Generator().manual_seed(seed)
    areas = torch.tensor([
        4 * math.pi * r * r if h == 0 else 2 * math.pi * r * 2 * h for _, r, h in _BODY_PARTS
    ])
    part = torch.multinomial(areas / areas.sum(), n, replacement=True, generator=gen)
    centre = torch.tensor([c for c, _, _ in _BODY_PARTS])[part]
    radius = torch.tensor([r for _, r, _ in _BODY_PARTS])[part]
    half = torch.tensor([h for _, _, h in _BODY_PARTS])[part]
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    # Cylinders: a point on the side at a uniform height; spheres: the point on the sphere itself.
    on_cylinder = half > 0
    direction[on_cylinder, 1] = 0
    direction = torch.nn.functional.normalize(direction, dim=-1)
    height = (torch.rand(n, generator=gen) * 2 - 1) * half
    means = centre + radius[:, None] * direction + torch.stack([0 * height, height, 0 * height], dim=-1)

    n_coeffs = (sh_degree + 1) ** 2
    sh = torch.randn(n, n_coeffs, 3, generator=gen) * 0.05
    sh[:, 0] = (torch.tensor([0.8, 0.6, 0.5]) - 0.5) / 0.2820947917738781 + 0.3 * torch.randn(n, 3, generator=gen)

    # Camera 3 m in front of the figure (on +z, looking at -z), centred on its middle; OpenCV axes.
    viewmat = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],
        [0.0, -1.0, 0.0, 0.85],
        [0.0, 0.0, -1.0, 3.0],
        [0.0, 0.0, 0.0, 1.0],
    ])
    focal = size * 3.0 / 2.0  # the frame spans 2 m at the figure's distance
    K = torch.tensor([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])
    return {
        "means": means,
        "quats": torch.randn(n, 4, generator=gen),
        "scales": torch.exp(torch.empty(n, 3).uniform_(math.log(0.005), math.log(0.015), generator=gen)),
        "opacities": torch.empty(n).uniform_(0.5, 1.0, generator=gen),
        "colors": sh,
        "viewmats": viewmat[None],
        "Ks": K[None],
        "width": size,
        "height": size,
        "sh_degree": sh_degree,
    }


def _on_device(scene: dict, backend: str) -> dict:
    """The scene on the GPU for backend "cuda" (gsplat renders CUDA tensors only), else as is."""
    if backend != "cuda":
        return scene
    if not torch.cuda.is_available():
        raise HDAError("bench raster: backend 'cuda' needs a CUDA device and torch built with CUDA; "
                       "expected backend 'cpu' on this machine")
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in scene.items()}


def _render_ms(scene: dict, backend: str, backward: bool) -> float:
    params = ("means", "quats", "scales", "opacities", "colors")
    kwargs = dict(scene)
    if backward:
        for name in params:
            kwargs[name] = scene[name].clone().requires_grad_(True)
    cuda = scene["means"].is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    if backward:
        colors, alphas, _ = rasterize(**kwargs, backend=backend)
        (colors.sum() + alphas.sum()).backward()
    else:
        with torch.no_grad():
            rasterize(**kwargs, backend=backend)
    if cuda:
        torch.cuda.synchronize()  # CUDA kernels run asynchronously; time their completion
    return (time.perf_counter() - start) * 1000.0


def _first_call(backend: str) -> tuple[float, str]:
    """Seconds of a first tiny forward+backward, and what numba did in it: "compiled" the kernels,
    loaded them from its on-disk "cache", found them "warm" in this process, or was "not used" (backend
    "cuda", or numba missing)."""
    raster = _numba_raster() if backend == "cpu" else None
    kernels = (raster._bin_tiles, raster._forward, raster._backward, raster._scatter_add) if raster else ()
    before = [k.signatures for k in kernels]
    start = time.perf_counter()
    _render_ms(_on_device(avatar_scene(64, 32), backend), backend, backward=True)
    seconds = time.perf_counter() - start
    if raster is None:
        return seconds, "not used"
    if all(before):
        return seconds, "warm"
    misses = sum(sum(k.stats.cache_misses.values()) for k in kernels)
    return seconds, "compiled" if misses else "cache"


def bench_raster(
    counts=(10_000, 60_000), sizes=(256, 512), repeats: int = 7, backend: str = "cpu"
) -> list[dict]:
    """Forward and forward+backward times of `rasterize` on avatar scenes (one camera, SH degree 3).

    The forward runs under torch.no_grad() (a viewport render); the forward+backward renders with every
    Gaussian parameter requiring grad and backpropagates colors.sum() + alphas.sum(). Each configuration
    gets one untimed warm-up, then `repeats` timed runs. The first call in the process, which compiles
    the numba kernels (or loads them from numba's cache), is timed once and reported in every row.

    Returns:
        One dict per (count, size): n, size, backend, forward_ms and forward_backward_ms (medians),
        forward_min_ms and forward_backward_min_ms, first_call_s, first_call ("compiled", "cache", "warm"
        or "not used"), repeats, threads (torch's intra-op thread count, which the numba kernels follow),
        load (the 1-minute load average before the row, None where the OS has none: other processes
        on the same cores inflate the medians far more than the minima), omp_wait_policy (the
        OMP_WAIT_POLICY the process started with; see `print_bench_raster`).
    """
    first_call_s, first_call = _first_call(backend)
    rows = []
    for n in counts:
        for size in sizes:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            scene = _on_device(avatar_scene(n, size), backend)
            times = {}
            for backward in (False, True):
                _render_ms(scene, backend, backward)
                times[backward] = [_render_ms(scene, backend, backward) for _ in range(repeats)]
            rows.append({
                "n": n, "size": size, "backend": backend,
                "forward_ms": statistics.median(times[False]),
                "forward_backward_ms": statistics.median(times[True]),
                "forward_min_ms": min(times[False]), "forward_backward_min_ms": min(times[True]),
                "first_call_s": first_call_s, "first_call": first_call, "repeats": repeats,
                "threads": torch.get_num_threads(), "load": load,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            })
    return rows


def print_bench_raster(rows: list[dict]) -> None:
    """Print `bench_raster` rows as a table, then the one-off first-call (JIT) time."""
    print(f"{'N':>7} {'size':>9} {'backend':>7}  {'forward ms':>16}  {'fwd+bwd ms':>16}  {'load':>5}")
    print(f"{'':>7} {'':>9} {'':>7}  {'median':>8}{'min':>8}  {'median':>8}{'min':>8}")
    for r in rows:
        load = "-" if r["load"] is None else f"{r['load']:.1f}"
        print(f"{r['n']:>7} {r['size']:>4}x{r['size']:<4} {r['backend']:>7}  {r['forward_ms']:>8.1f}"
              f"{r['forward_min_ms']:>8.1f}  {r['forward_backward_ms']:>8.1f}{r['forward_backward_min_ms']:>8.1f}"
              f"  {load:>5}")
    if rows:
        r = rows[0]
        print(f"{r['repeats']} runs after a warm-up, {r['threads']} threads, OMP_WAIT_POLICY {r['omp_wait_policy']}; "
              f"first call: {r['first_call_s']:.2f} s (numba {r['first_call']})")
        if r["omp_wait_policy"].upper() != "PASSIVE":
            # torch's and numba's OpenMP runtimes are separate; their idle threads spin and, when other
            # work shares the cores, starve each other (frames 10x slower). The policy is read when torch
            # loads, so it must be in the environment before the process starts.
            print("note: with other load on these cores, start the process with OMP_WAIT_POLICY=PASSIVE")


def main() -> None:
    print_bench_raster(bench_raster())


if __name__ == "__main__":
    main()
