"""`rasterize`: 3D Gaussian splatting with gsplat's conventions, on CUDA (gsplat) or on the CPU (our own).

The CPU backend splits the work like gsplat: projection and SH colours, then a raster step, each with its
own backward. The projection and SH colours run as one numba kernel with an analytic backward
(`_projection_numba`), tested against their PyTorch twins in `_projection` (which autograd differentiates;
they run where the cameras need a gradient, for inputs that are not float32, and without numba). The raster
step runs as numba kernels over 16×16 tiles (`_raster_numba`), or, when numba is missing or
backend="torch", as the dense PyTorch twin (`_raster_torch`) the kernels are tested against.
"""

from __future__ import annotations

import functools

import torch

from ..errors import HDAError
from ._projection import project_gaussians, spherical_harmonics
from ._raster_torch import rasterize_torch

RENDER_MODES = ("RGB", "ED", "RGB+ED")
BACKENDS = ("auto", "cpu", "cuda", "torch")
MAX_IMAGE_SIZE = 8192
MAX_SH_DEGREE = 3
EPS2D = 0.3


@functools.lru_cache(maxsize=1)
def _numba_raster():
    """The numba raster module, or None when numba cannot be imported (the PyTorch twin is used then)."""
    try:
        from . import _raster_numba
    except ImportError:
        return None
    return _raster_numba


@functools.lru_cache(maxsize=1)
def _numba_projection():
    """The fused numba projection module (imported with the raster kernels, so present with them)."""
    from . import _projection_numba
    return _projection_numba


def _fused_projection(inputs, cameras) -> bool:
    """Whether the CPU backend may project and shade with the fused numba kernel: it computes in float32,
    the dtype of every input and camera, and its backward gives no gradient to the cameras (viewmats, Ks)."""
    return (all(t.dtype == torch.float32 for t in (*inputs, *cameras))
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in cameras)))


def numba_available() -> bool:
    """Whether backend="cpu" runs the compiled numba kernels (else it runs the PyTorch twin)."""
    return _numba_raster() is not None


def rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    sh_degree: int | None = None,
    backgrounds: torch.Tensor | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    render_mode: str = "RGB",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Render N 3D Gaussians into C cameras (gsplat `rasterization`, classic mode, packed=False).

    Args:
        means: [N,3] world-space centres.
        quats: [N,4] rotations as wxyz quaternions; normalised internally.
        scales: [N,3] standard deviations (after exp).
        opacities: [N] opacities in [0,1] (after sigmoid).
        colors: [N,D] post-activation features when sh_degree is None, else [N,K,3] SH coefficients with
            (sh_degree+1)^2 <= K; SH colours are evaluated towards each camera (dirs = means - campos) and
            mapped with max(0, value + 0.5).
        viewmats: [C,4,4] world→camera transforms, OpenCV axes (x right, y down, z forward).
        Ks: [C,3,3] pinhole intrinsics (fx, fy, cx, cy; skew ignored).
        width, height: image size in pixels, 1..8192.
        sh_degree: None, or the SH degree 0..3 to evaluate.
        backgrounds: [C,D] colours behind the Gaussians (D = 3 with SH), or None for black. The depth
            channel always has background 0; render_mode "ED" ignores backgrounds.
        near_plane, far_plane: Gaussians with camera depth outside (near_plane, far_plane) are culled.
        render_mode: "RGB"; "RGB+ED" appends expected depth Σ w_i z_i / Σ w_i as a last channel
            (0 where nothing was hit); "ED" renders that depth alone.
        backend: "cuda" calls `gsplat.rasterization` (CUDA tensors, gsplat with CUDA); "cpu" runs the
            project's tiled numba rasterizer (the PyTorch twin if numba is missing); "torch" forces the
            PyTorch twin (any device, slow); "auto" picks "cuda" for CUDA tensors and "cpu" otherwise.

    Returns:
        colors: [C,H,W,D'] rendered features, D' = D (RGB), D+1 (RGB+ED) or 1 (ED).
        alphas: [C,H,W,1] accumulated opacity, 1 - final transmittance.
        meta: dict of intermediate results, with shapes
            "radii" [C,N,2] int32 pixel half-extents (0 = culled), "means2d" [C,N,2] (differentiable; call
            retain_grad() on it for screen-space gradients), "depths" [C,N], "conics" [C,N,3] inverse 2D
            covariance (a, b, c), "opacities" [C,N], "width", "height", "n_cameras", "backend" (the one
            that ran: "cuda", "cpu" or "torch"), and from the tiled backends "tile_size", "tile_width",
            "tile_height", "isect_offsets" [C,TH,TW] int32 and "flatten_ids" [n_isects] int32 (tile runs of
            indices into the flattened [C*N] Gaussians, front to back). The "cuda" backend returns
            gsplat's meta dict, which has all of these but "backend" (added here).

    Raises:
        HDAError: on a malformed argument (shape, non-finite value, size, mode, backend, SH degree).
    """
    C, N = _validate(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
        near_plane, far_plane, render_mode, backend,
    )
    if backend == "auto":
        backend = "cuda" if means.is_cuda else "cpu"
    if backend == "cuda":
        return _rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
            near_plane, far_plane, render_mode,
        )
    if backend == "cpu" and means.device.type != "cpu":
        raise HDAError(f"rasterize: backend 'cpu' got tensors on {means.device}; expected CPU tensors")

    raster = _numba_raster() if backend == "cpu" else None
    if raster is not None and _fused_projection((means, quats, scales, opacities, colors), (viewmats, Ks)):
        radii, means2d, depths, conics, shaded = _numba_projection().project_and_shade(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, EPS2D, near_plane, far_plane)
    else:
        radii, means2d, depths, conics = project_gaussians(
            means, quats, scales, viewmats, Ks, width, height, opacities=opacities,
            eps2d=EPS2D, near_plane=near_plane, far_plane=far_plane,
        )
        shaded = None
        if sh_degree is not None:
            campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C,3]
            dirs = means[None, :, :] - campos[:, None, :]
            shaded = torch.clamp_min(spherical_harmonics(sh_degree, dirs, colors) + 0.5, 0.0)
    feats = colors[None].expand(C, N, colors.shape[-1]) if sh_degree is None else shaded
    if render_mode == "RGB+ED":
        feats = torch.cat([feats, depths[..., None]], dim=-1)
    elif render_mode == "ED":
        feats = depths[..., None]
    opac = opacities[None].expand(C, N)

    meta = {
        "radii": radii, "means2d": means2d, "depths": depths, "conics": conics, "opacities": opac,
        "width": width, "height": height, "n_cameras": C,
    }
    if raster is not None:
        opac = opac.contiguous()
        isect_offsets, flatten_ids = raster.bin_tiles(means2d, conics, opac, radii, depths, width, height)
        render, alphas = raster.NumbaRasterize.apply(
            means2d, conics, feats.contiguous(), opac, isect_offsets, flatten_ids, width, height
        )
        meta.update(
            backend="cpu", tile_size=raster.TILE_SIZE, tile_width=isect_offsets.shape[2],
            tile_height=isect_offsets.shape[1], isect_offsets=isect_offsets, flatten_ids=flatten_ids,
        )
    else:
        render, alphas = rasterize_torch(means2d, conics, feats, opac, radii, depths, width, height)
        meta["backend"] = "torch"

    if backgrounds is not None and render_mode != "ED":
        bg = backgrounds if render_mode == "RGB" else torch.cat([backgrounds, torch.zeros_like(backgrounds[:, :1])], dim=-1)
        render = render + bg[:, None, None, :] * (1.0 - alphas)
    if render_mode != "RGB":
        render = torch.cat([render[..., :-1], render[..., -1:] / alphas.clamp(min=1e-10)], dim=-1)
    return render, alphas, meta


def _rasterize_gsplat(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
    near_plane, far_plane, render_mode,
):
    if not means.is_cuda:
        raise HDAError(f"rasterize: backend 'cuda' got tensors on {means.device}; expected CUDA tensors")
    try:
        from gsplat import rasterization
    except ImportError as exc:
        raise HDAError(f"rasterize: backend 'cuda' needs gsplat with its CUDA extension ({exc}); "
                       "expected backend 'cpu' or an installed gsplat") from exc
    render, alphas, meta = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=EPS2D, sh_degree=sh_degree, packed=False,
        tile_size=16, backgrounds=backgrounds, render_mode=render_mode, rasterize_mode="classic",
    )
    meta["backend"] = "cuda"
    return render, alphas, meta


def _shape_str(t: torch.Tensor) -> str:
    return "[" + ",".join(str(s) for s in t.shape) + "]"


def _validate(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
    near_plane, far_plane, render_mode, backend,
):
    """Check every argument; returns (C, N)."""
    if render_mode not in RENDER_MODES:
        raise HDAError(f"rasterize: render_mode is {render_mode!r}; expected one of {', '.join(RENDER_MODES)}")
    if backend not in BACKENDS:
        raise HDAError(f"rasterize: backend is {backend!r}; expected one of {', '.join(BACKENDS)}")
    for name, size in (("width", width), ("height", height)):
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
            raise HDAError(f"rasterize: {name} is {size!r}; expected an integer in 1..{MAX_IMAGE_SIZE}")
    if not (isinstance(near_plane, (int, float)) and isinstance(far_plane, (int, float))
            and 0 < near_plane < far_plane):
        raise HDAError(f"rasterize: near_plane/far_plane are {near_plane!r}/{far_plane!r}; "
                       "expected 0 < near_plane < far_plane")
    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors,
               "viewmats": viewmats, "Ks": Ks}
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise HDAError(f"rasterize: {name} is {kind}; expected a floating-point torch.Tensor")
        if t.device != means.device:
            raise HDAError(f"rasterize: {name} is on {t.device}; expected the device of means ({means.device})")

    if means.dim() != 2 or means.shape[1] != 3:
        raise HDAError(f"rasterize: means has shape {_shape_str(means)}; expected [N,3]")
    N = means.shape[0]
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4) or viewmats.shape[0] < 1:
        raise HDAError(f"rasterize: viewmats has shape {_shape_str(viewmats)}; expected [C,4,4] with C >= 1")
    C = viewmats.shape[0]
    if sh_degree is not None:
        if isinstance(sh_degree, bool) or not isinstance(sh_degree, int) or not 0 <= sh_degree <= MAX_SH_DEGREE:
            raise HDAError(f"rasterize: sh_degree is {sh_degree!r}; expected None or an integer in 0..{MAX_SH_DEGREE}")
        need = (sh_degree + 1) ** 2
        if colors.dim() != 3 or colors.shape[0] != N or colors.shape[2] != 3:
            raise HDAError(f"rasterize: colors has shape {_shape_str(colors)} with sh_degree={sh_degree}; "
                           f"expected SH coefficients [N,K,3] with N={N}, K >= {need}")
        if colors.shape[1] < need:
            raise HDAError(f"rasterize: colors has K={colors.shape[1]} SH coefficients; expected K >= {need} "
                           f"for sh_degree={sh_degree} (or a lower sh_degree)")
        channels = 3
    else:
        if colors.dim() != 2 or colors.shape[0] != N or colors.shape[1] < 1:
            raise HDAError(f"rasterize: colors has shape {_shape_str(colors)}; expected [N,D] with N={N} "
                           "(or [N,K,3] with sh_degree set)")
        channels = colors.shape[1]
    expected = {"quats": (N, 4), "scales": (N, 3), "opacities": (N,), "Ks": (C, 3, 3)}
    if backgrounds is not None:
        expected["backgrounds"] = (C, channels)
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise HDAError(f"rasterize: {name} has shape {_shape_str(tensors[name])}; "
                           f"expected [{','.join(str(s) for s in shape)}]")
    # NaN and ±inf survive a float64 sum, so one cheap reduction per input (and a single sync for a CUDA
    # caller) screens them all; the element-wise search only runs once a sum is not finite.
    if not bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float64) for t in tensors.values()])).all()):
        for name, t in tensors.items():
            bad = ~torch.isfinite(t)
            if bad.any():
                index = tuple(int(i) for i in torch.nonzero(bad)[0])
                raise HDAError(f"rasterize: {name} has a non-finite value ({t[index].item()}) at index "
                               f"{list(index)}; expected finite numbers")
    return C, N
