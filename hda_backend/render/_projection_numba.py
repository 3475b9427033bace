"""EWA projection and SH colours fused into one numba kernel, with an analytic backward: the rasterizer's
fast path on the CPU.

:func:`project_and_shade` gives what ``_projection.project_gaussians`` (with opacities) and
``_projection.spherical_harmonics`` (+0.5, clamped at 0) give, its slow, obviously correct twins, in one
pass over the Gaussians instead of about a hundred PyTorch operations on [C,N] tensors: for one avatar
(10^4 Gaussians) the operations' fixed costs, not the arithmetic, were 3.3 ms of a 512² frame
(README, Speed). Every step is the twin's, in the twin's order and in float32.

Its backward (``_project_backward``) differentiates the same steps by hand, one Gaussian per iteration, for
means, quats, scales and SH coefficients: a fit's step then no longer runs the twins' operations and
their autograd graph (README, Fitting, *Cost per subject*). The cameras get no gradient, so ``rasterize``
keeps the twins where viewmats or Ks need one. ``tests/test_rasterize.py`` compares the outputs with the
twins' and the gradients with autograd's through the twins.

The kernels are compiled without fastmath, so a process that compiles them and one that loads them from
numba's cache compute the same bits.

Importing this module needs numba; ``rasterize`` falls back to the twins when it is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

from ._projection import DET_MIN, FOV_MARGIN, MAX_EXTEND, SH_BASIS
from ._raster_numba import _ALPHA_THRESHOLD, _F32, _HALF, _ONE, _ZERO, _f32, _run_parallel

# The twin's constants as float32 (a Python float would promote the kernel's arithmetic to float64).
_TWO = _F32(2.0)
_CLIP = _F32(FOV_MARGIN)
_DET_MIN = _F32(DET_MIN)
_NORM_EPS = _F32(1e-12)                # F.normalize's eps
_EXTEND = _F32(MAX_EXTEND)
_B = tuple(_F32(c) for c in SH_BASIS)  # the SH basis constants
_THREE = _F32(3.0)
_SIX = _F32(6.0)


@njit(inline="always")
def _row(V, i, m0, m1, m2):
    """Row i of Rv·M, for one column of M (m0, m1, m2)."""
    return V[i, 0] * m0 + V[i, 1] * m1 + V[i, 2] * m2


@njit(inline="always")
def _add_band(coeffs, n, k, basis, r, g, b):
    """The colour so far (r, g, b) plus one SH basis value times Gaussian n's coefficient k."""
    return r + basis * coeffs[n, k, 0], g + basis * coeffs[n, k, 1], b + basis * coeffs[n, k, 2]


@njit(inline="always")
def _sh_colour(coeffs, n, sh_degree, x, y, z):
    """Gaussian n's SH colour (before + 0.5) towards the unit direction (x, y, z), gsplat's bases in order."""
    r, g, bl = _add_band(coeffs, n, 0, _B[0], _ZERO, _ZERO, _ZERO)
    if sh_degree >= 1:
        r, g, bl = _add_band(coeffs, n, 1, -_B[1] * y, r, g, bl)
        r, g, bl = _add_band(coeffs, n, 2, _B[1] * z, r, g, bl)
        r, g, bl = _add_band(coeffs, n, 3, -_B[1] * x, r, g, bl)
    if sh_degree >= 2:
        z2 = z * z
        fc1 = x * x - y * y
        fs1 = _TWO * x * y
        tb = _B[2] * z
        r, g, bl = _add_band(coeffs, n, 4, _B[3] * fs1, r, g, bl)
        r, g, bl = _add_band(coeffs, n, 5, tb * y, r, g, bl)
        r, g, bl = _add_band(coeffs, n, 6, _B[4] * z2 - _B[5], r, g, bl)
        r, g, bl = _add_band(coeffs, n, 7, tb * x, r, g, bl)
        r, g, bl = _add_band(coeffs, n, 8, _B[3] * fc1, r, g, bl)
        if sh_degree >= 3:
            tc = _B[6] * z2 + _B[7]
            tb3 = _B[8] * z
            fc2 = x * fc1 - y * fs1
            fs2 = x * fs1 + y * fc1
            r, g, bl = _add_band(coeffs, n, 9, _B[9] * fs2, r, g, bl)
            r, g, bl = _add_band(coeffs, n, 10, tb3 * fs1, r, g, bl)
            r, g, bl = _add_band(coeffs, n, 11, tc * y, r, g, bl)
            r, g, bl = _add_band(coeffs, n, 12, z * (_B[10] * z2 - _B[11]), r, g, bl)
            r, g, bl = _add_band(coeffs, n, 13, tc * x, r, g, bl)
            r, g, bl = _add_band(coeffs, n, 14, tb3 * fc1, r, g, bl)
            r, g, bl = _add_band(coeffs, n, 15, _B[9] * fc2, r, g, bl)
    return r, g, bl


@njit(inline="always")
def _band_backward(coeffs, g_coeffs, n, k, basis, vr, vg, vb):
    """Adds band k's coefficient gradient for the colour gradient (vr, vg, vb); returns its basis value's."""
    g_coeffs[n, k, 0] += basis * vr
    g_coeffs[n, k, 1] += basis * vg
    g_coeffs[n, k, 2] += basis * vb
    return coeffs[n, k, 0] * vr + coeffs[n, k, 1] * vg + coeffs[n, k, 2] * vb


@njit(parallel=True, cache=True)
def _project(means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near, far, campos,
             coeffs, sh_degree, radii, means2d, depths, conics, rgb):
    n_gauss = means.shape[0]
    w_f, h_f = _F32(width), _F32(height)
    for f in prange(viewmats.shape[0] * n_gauss):
        c, n = f // n_gauss, f % n_gauss
        V, K = viewmats[c], Ks[c]
        # The camera-space centre (means @ Rvᵀ + t).
        px, py, pz = means[n, 0], means[n, 1], means[n, 2]
        tx = V[0, 0] * px + V[0, 1] * py + V[0, 2] * pz + V[0, 3]
        ty = V[1, 0] * px + V[1, 1] * py + V[1, 2] * pz + V[1, 3]
        tz = V[2, 0] * px + V[2, 1] * py + V[2, 2] * pz + V[2, 3]
        # M = R(q)·diag(s) (quat_scale_to_rs), column by column.
        qw, qx, qy, qz = quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3]
        qn = max(np.sqrt(qw * qw + qx * qx + qy * qy + qz * qz), _NORM_EPS)
        qw, qx, qy, qz = qw / qn, qx / qn, qy / qn, qz / qn
        sx, sy, sz = scales[n, 0], scales[n, 1], scales[n, 2]
        m00 = (_ONE - _TWO * (qy * qy + qz * qz)) * sx
        m10 = (_TWO * (qx * qy + qw * qz)) * sx
        m20 = (_TWO * (qx * qz - qw * qy)) * sx
        m01 = (_TWO * (qx * qy - qw * qz)) * sy
        m11 = (_ONE - _TWO * (qx * qx + qz * qz)) * sy
        m21 = (_TWO * (qy * qz + qw * qx)) * sy
        m02 = (_TWO * (qx * qz + qw * qy)) * sz
        m12 = (_TWO * (qy * qz - qw * qx)) * sz
        m22 = (_ONE - _TWO * (qx * qx + qy * qy)) * sz
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        lim_x_pos = (w_f - cx) / fx + _CLIP * (_HALF * w_f / fx)
        lim_x_neg = cx / fx + _CLIP * (_HALF * w_f / fx)
        lim_y_pos = (h_f - cy) / fy + _CLIP * (_HALF * h_f / fy)
        lim_y_neg = cy / fy + _CLIP * (_HALF * h_f / fy)
        txc = tz * max(min(tx / tz, lim_x_pos), -lim_x_neg)
        tyc = tz * max(min(ty / tz, lim_y_pos), -lim_y_neg)
        # J·Rv·M, J = [[fx/z, 0, -fx·x/z²], [0, fy/z, -fy·y/z²]], one column k of M at a time.
        ax, az = fx / tz, fx * txc / (tz * tz)
        by, bz = fy / tz, fy * tyc / (tz * tz)
        j00 = ax * _row(V, 0, m00, m10, m20) - az * _row(V, 2, m00, m10, m20)
        j10 = by * _row(V, 1, m00, m10, m20) - bz * _row(V, 2, m00, m10, m20)
        j01 = ax * _row(V, 0, m01, m11, m21) - az * _row(V, 2, m01, m11, m21)
        j11 = by * _row(V, 1, m01, m11, m21) - bz * _row(V, 2, m01, m11, m21)
        j02 = ax * _row(V, 0, m02, m12, m22) - az * _row(V, 2, m02, m12, m22)
        j12 = by * _row(V, 1, m02, m12, m22) - bz * _row(V, 2, m02, m12, m22)
        a = (j00 * j00 + j01 * j01 + j02 * j02) + eps2d
        b = j00 * j10 + j01 * j11 + j02 * j12
        cc = (j10 * j10 + j11 * j11 + j12 * j12) + eps2d
        det_raw = a * cc - b * b
        det = max(det_raw, _DET_MIN)
        conics[f, 0], conics[f, 1], conics[f, 2] = cc / det, -b / det, a / det
        mx, my = fx * tx / tz + cx, fy * ty / tz + cy
        means2d[f, 0], means2d[f, 1] = mx, my
        depths[f] = tz
        op = opacities[n]
        extend = min(_EXTEND, np.sqrt(_TWO * np.log(max(op, _ALPHA_THRESHOLD) / _ALPHA_THRESHOLD)))
        rx, ry = np.ceil(extend * np.sqrt(a)), np.ceil(extend * np.sqrt(cc))
        valid = (det_raw > _ZERO and tz > near and tz < far and op >= _ALPHA_THRESHOLD
                 and mx + rx > _ZERO and mx - rx < w_f and my + ry > _ZERO and my - ry < h_f)
        radii[f, 0] = np.int32(rx) if valid else 0
        radii[f, 1] = np.int32(ry) if valid else 0
        if sh_degree < 0:
            continue
        # The direction from the camera, normalised; then gsplat's SH bases (_projection._sh_bases).
        dx, dy, dz = px - campos[c, 0], py - campos[c, 1], pz - campos[c, 2]
        dn = max(np.sqrt(dx * dx + dy * dy + dz * dz), _NORM_EPS)
        r, g, bl = _sh_colour(coeffs, n, sh_degree, dx / dn, dy / dn, dz / dn)
        rgb[f, 0], rgb[f, 1], rgb[f, 2] = max(r + _HALF, _ZERO), max(g + _HALF, _ZERO), max(bl + _HALF, _ZERO)


def project_and_shade(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                      sh_degree: int | None, eps2d: float, near_plane: float, far_plane: float):
    """``project_gaussians(..., opacities=opacities)`` and, with ``sh_degree``, the SH colours, in one kernel.

    Differentiable in means, quats, scales and colors (the analytic backward, ``_project_backward``);
    viewmats and Ks get no gradient, and opacities none through this step (they only bound the radii).

    Args:
        means: [N,3]; quats: [N,4] wxyz (any norm); scales: [N,3]; opacities: [N]; colors: [N,K,3] SH
            coefficients when ``sh_degree`` is set (else unused); viewmats: [C,4,4]; Ks: [C,3,3]: as
            ``rasterize`` takes them, float32 CPU tensors.
        sh_degree: None, or 0..3.

    Returns:
        radii [C,N,2] int32, means2d [C,N,2], depths [C,N], conics [C,N,3] (float32, as the twin), and
        rgb [C,N,3] = max(0, SH colour + 0.5) towards each camera, or None without ``sh_degree``.
    """
    differentiable = (means, quats, scales) + ((colors,) if sh_degree is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
        radii, means2d, depths, conics, rgb = _ProjectAndShade.apply(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, eps2d,
            near_plane, far_plane)
        return radii, means2d, depths, conics, rgb if sh_degree is not None else None
    arrays = _KernelInputs.of(means, quats, scales, colors, viewmats, Ks, sh_degree)
    return _forward(arrays, opacities, width, height, sh_degree, eps2d, near_plane, far_plane)


@dataclass(frozen=True)
class _KernelInputs:
    """The float32 arrays both kernels read, made once per projection: the backward reuses the forward's."""

    means: np.ndarray      # [N,3]
    quats: np.ndarray      # [N,4]
    scales: np.ndarray     # [N,3]
    viewmats: np.ndarray   # [C,4,4]
    Ks: np.ndarray         # [C,3,3]
    campos: np.ndarray     # [C,3] the cameras' centres in world space, as the twin computes them
    coeffs: np.ndarray     # [N,K,3] SH coefficients; [0,1,3] without sh_degree

    @classmethod
    def of(cls, means, quats, scales, colors, viewmats, Ks, sh_degree) -> "_KernelInputs":
        coeffs = _f32(colors) if sh_degree is not None else np.zeros((0, 1, 3), dtype=np.float32)
        return cls(_f32(means), _f32(quats), _f32(scales), _f32(viewmats), _f32(Ks),
                   _f32(torch.linalg.inv(viewmats.detach())[:, :3, 3]), coeffs)


def _forward(arrays: _KernelInputs, opacities, width, height, sh_degree, eps2d, near_plane, far_plane):
    C, N = arrays.viewmats.shape[0], arrays.means.shape[0]
    radii = np.empty((C * N, 2), dtype=np.int32)
    means2d = np.empty((C * N, 2), dtype=np.float32)
    depths = np.empty(C * N, dtype=np.float32)
    conics = np.empty((C * N, 3), dtype=np.float32)
    shaded = sh_degree is not None
    rgb = np.empty((C * N if shaded else 0, 3), dtype=np.float32)
    _run_parallel(_project, arrays.means, arrays.quats, arrays.scales, _f32(opacities), arrays.viewmats,
                  arrays.Ks, width, height, _F32(eps2d), _F32(near_plane), _F32(far_plane), arrays.campos,
                  arrays.coeffs, -1 if sh_degree is None else sh_degree, radii, means2d, depths, conics, rgb,
                  tiles_per_chunk=0)
    out = [torch.from_numpy(radii).reshape(C, N, 2), torch.from_numpy(means2d).reshape(C, N, 2),
           torch.from_numpy(depths).reshape(C, N), torch.from_numpy(conics).reshape(C, N, 3)]
    return (*out, torch.from_numpy(rgb).reshape(C, N, 3) if shaded else None)


class _ProjectAndShade(torch.autograd.Function):
    """:func:`project_and_shade` with autograd: (means, quats, scales, colors) → (means2d, depths, conics,
    rgb); radii are not differentiable, and rgb is [C,N,0] without ``sh_degree``."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, eps2d,
                near_plane, far_plane):
        arrays = _KernelInputs.of(means, quats, scales, colors, viewmats, Ks, sh_degree)
        radii, means2d, depths, conics, rgb = _forward(arrays, opacities, width, height, sh_degree, eps2d,
                                                       near_plane, far_plane)
        if rgb is None:
            rgb = means2d.new_zeros(means2d.shape[:2] + (0,))
        # The tensors are saved too, so that autograd refuses a backward after one was changed in place.
        ctx.save_for_backward(means, quats, scales, colors)
        ctx.arrays, ctx.config = arrays, (width, height, sh_degree, eps2d)
        ctx.mark_non_differentiable(radii)
        return radii, means2d, depths, conics, rgb

    @staticmethod
    def backward(ctx, v_radii, v_means2d, v_depths, v_conics, v_rgb):
        colors = ctx.saved_tensors[3]
        arrays, (width, height, sh_degree, eps2d) = ctx.arrays, ctx.config
        C, N = arrays.viewmats.shape[0], arrays.means.shape[0]
        g_means = np.zeros((N, 3), dtype=np.float32)
        g_quats = np.zeros((N, 4), dtype=np.float32)
        g_scales = np.zeros((N, 3), dtype=np.float32)
        g_coeffs = np.zeros_like(arrays.coeffs)
        v_rgb = _f32(v_rgb).reshape(-1, 3)  # [C*N,3], or [0,3] without sh_degree
        _run_parallel(_project_backward, arrays.means, arrays.quats, arrays.scales, arrays.viewmats, arrays.Ks,
                      width, height, _F32(eps2d), arrays.campos, arrays.coeffs,
                      -1 if sh_degree is None else sh_degree, _f32(v_means2d).reshape(C * N, 2),
                      _f32(v_depths).reshape(C * N), _f32(v_conics).reshape(C * N, 3), v_rgb,
                      g_means, g_quats, g_scales, g_coeffs, tiles_per_chunk=0)
        g_colors = torch.from_numpy(g_coeffs).reshape(colors.shape) if sh_degree is not None else None
        return (torch.from_numpy(g_means), torch.from_numpy(g_quats), torch.from_numpy(g_scales), None, g_colors,
                None, None, None, None, None, None, None, None)


@njit(inline="always")
def _normalize_backward(gx, gy, gz, x, y, z, norm):
    """The gradient through F.normalize: ux = x / max(norm, eps), with (gx, gy, gz) at the unit vector;
    the norm's own gradient is cut where the eps clamp holds, as torch's clamp_min cuts it."""
    if norm < _NORM_EPS:
        return gx / _NORM_EPS, gy / _NORM_EPS, gz / _NORM_EPS
    dot = (gx * x + gy * y + gz * z) / (norm * norm)
    return (gx - x * dot) / norm, (gy - y * dot) / norm, (gz - z * dot) / norm


@njit(parallel=True, cache=True)
def _project_backward(means, quats, scales, viewmats, Ks, width, height, eps2d, campos, coeffs, sh_degree,
                      v_means2d, v_depths, v_conics, v_rgb, g_means, g_quats, g_scales, g_coeffs):
    """The gradient of ``_project``'s differentiable outputs (means2d, depths, conics, rgb) with respect to
    means, quats, scales and the SH coefficients; one Gaussian per iteration, its cameras in turn, so that
    every Gaussian writes only its own rows (no races, the same result on any thread count).

    Each intermediate is recomputed as ``_project`` computes it, then differentiated by hand in reverse
    order; where the twins have a clamp, the gradient follows torch's rule for it (a clamp passes the
    gradient where its input is ≥ the bound, minimum/maximum where the input is strictly inside)."""
    n_gauss, n_cams = means.shape[0], viewmats.shape[0]
    w_f, h_f = _F32(width), _F32(height)
    for n in prange(n_gauss):
        px, py, pz = means[n, 0], means[n, 1], means[n, 2]
        qw0, qx0, qy0, qz0 = quats[n, 0], quats[n, 1], quats[n, 2], quats[n, 3]
        qnorm = np.sqrt(qw0 * qw0 + qx0 * qx0 + qy0 * qy0 + qz0 * qz0)
        qn = max(qnorm, _NORM_EPS)
        qw, qx, qy, qz = qw0 / qn, qx0 / qn, qy0 / qn, qz0 / qn
        sx, sy, sz = scales[n, 0], scales[n, 1], scales[n, 2]
        # R(q), then M = R·diag(s) column by column, as _project has it.
        r00, r01, r02 = _ONE - _TWO * (qy * qy + qz * qz), _TWO * (qx * qy - qw * qz), _TWO * (qx * qz + qw * qy)
        r10, r11, r12 = _TWO * (qx * qy + qw * qz), _ONE - _TWO * (qx * qx + qz * qz), _TWO * (qy * qz - qw * qx)
        r20, r21, r22 = _TWO * (qx * qz - qw * qy), _TWO * (qy * qz + qw * qx), _ONE - _TWO * (qx * qx + qy * qy)
        m00, m10, m20 = r00 * sx, r10 * sx, r20 * sx
        m01, m11, m21 = r01 * sy, r11 * sy, r21 * sy
        m02, m12, m22 = r02 * sz, r12 * sz, r22 * sz
        # Gradients gathered over the cameras: of M, of the centre, of the SH coefficients (in place).
        gm00 = gm01 = gm02 = gm10 = gm11 = gm12 = gm20 = gm21 = gm22 = _ZERO
        gpx = gpy = gpz = _ZERO
        for c in range(n_cams):
            f = c * n_gauss + n
            vmx, vmy, vd = v_means2d[f, 0], v_means2d[f, 1], v_depths[f]
            vc0, vc1, vc2 = v_conics[f, 0], v_conics[f, 1], v_conics[f, 2]
            V, K = viewmats[c], Ks[c]
            tx = V[0, 0] * px + V[0, 1] * py + V[0, 2] * pz + V[0, 3]
            ty = V[1, 0] * px + V[1, 1] * py + V[1, 2] * pz + V[1, 3]
            tz = V[2, 0] * px + V[2, 1] * py + V[2, 2] * pz + V[2, 3]
            gtx, gty, gtz = _ZERO, _ZERO, vd
            if vmx != _ZERO or vmy != _ZERO or vc0 != _ZERO or vc1 != _ZERO or vc2 != _ZERO:
                fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
                lim_x_pos = (w_f - cx) / fx + _CLIP * (_HALF * w_f / fx)
                lim_x_neg = cx / fx + _CLIP * (_HALF * w_f / fx)
                lim_y_pos = (h_f - cy) / fy + _CLIP * (_HALF * h_f / fy)
                lim_y_neg = cy / fy + _CLIP * (_HALF * h_f / fy)
                ux, uy = tx / tz, ty / tz
                cux = max(min(ux, lim_x_pos), -lim_x_neg)
                cuy = max(min(uy, lim_y_pos), -lim_y_neg)
                txc, tyc = tz * cux, tz * cuy
                ax, az = fx / tz, fx * txc / (tz * tz)
                by, bz = fy / tz, fy * tyc / (tz * tz)
                # Rv·M, row i, column k.
                a00, a01, a02 = _row(V, 0, m00, m10, m20), _row(V, 0, m01, m11, m21), _row(V, 0, m02, m12, m22)
                a10, a11, a12 = _row(V, 1, m00, m10, m20), _row(V, 1, m01, m11, m21), _row(V, 1, m02, m12, m22)
                a20, a21, a22 = _row(V, 2, m00, m10, m20), _row(V, 2, m01, m11, m21), _row(V, 2, m02, m12, m22)
                j00, j01, j02 = ax * a00 - az * a20, ax * a01 - az * a21, ax * a02 - az * a22
                j10, j11, j12 = by * a10 - bz * a20, by * a11 - bz * a21, by * a12 - bz * a22
                a = (j00 * j00 + j01 * j01 + j02 * j02) + eps2d
                b = j00 * j10 + j01 * j11 + j02 * j12
                cc = (j10 * j10 + j11 * j11 + j12 * j12) + eps2d
                det_raw = a * cc - b * b
                det = max(det_raw, _DET_MIN)
                # conics = (cc, -b, a) / det.
                gdet = -(vc0 * cc - vc1 * b + vc2 * a) / (det * det) if det_raw >= _DET_MIN else _ZERO
                ga = vc2 / det + gdet * cc
                gb = -vc1 / det - _TWO * b * gdet
                gcc = vc0 / det + gdet * a
                # a, b, cc from the rows of J·Rv·M.
                gj00, gj01, gj02 = _TWO * ga * j00 + gb * j10, _TWO * ga * j01 + gb * j11, _TWO * ga * j02 + gb * j12
                gj10, gj11, gj12 = _TWO * gcc * j10 + gb * j00, _TWO * gcc * j11 + gb * j01, _TWO * gcc * j12 + gb * j02
                g_ax = gj00 * a00 + gj01 * a01 + gj02 * a02
                g_az = -(gj00 * a20 + gj01 * a21 + gj02 * a22)
                g_by = gj10 * a10 + gj11 * a11 + gj12 * a12
                g_bz = -(gj10 * a20 + gj11 * a21 + gj12 * a22)
                # Rv·M → M (summed over the cameras below).
                ga00, ga01, ga02 = ax * gj00, ax * gj01, ax * gj02
                ga10, ga11, ga12 = by * gj10, by * gj11, by * gj12
                ga20, ga21, ga22 = -az * gj00 - bz * gj10, -az * gj01 - bz * gj11, -az * gj02 - bz * gj12
                gm00 += V[0, 0] * ga00 + V[1, 0] * ga10 + V[2, 0] * ga20
                gm10 += V[0, 1] * ga00 + V[1, 1] * ga10 + V[2, 1] * ga20
                gm20 += V[0, 2] * ga00 + V[1, 2] * ga10 + V[2, 2] * ga20
                gm01 += V[0, 0] * ga01 + V[1, 0] * ga11 + V[2, 0] * ga21
                gm11 += V[0, 1] * ga01 + V[1, 1] * ga11 + V[2, 1] * ga21
                gm21 += V[0, 2] * ga01 + V[1, 2] * ga11 + V[2, 2] * ga21
                gm02 += V[0, 0] * ga02 + V[1, 0] * ga12 + V[2, 0] * ga22
                gm12 += V[0, 1] * ga02 + V[1, 1] * ga12 + V[2, 1] * ga22
                gm22 += V[0, 2] * ga02 + V[1, 2] * ga12 + V[2, 2] * ga22
                # ax = fx/tz, az = fx·txc/tz², by = fy/tz, bz = fy·tyc/tz².
                tz2 = tz * tz
                g_txc, g_tyc = g_az * fx / tz2, g_bz * fy / tz2
                gtz += (-g_ax * fx - g_by * fy) / tz2 - _TWO * (g_az * fx * txc + g_bz * fy * tyc) / (tz2 * tz)
                # txc = tz·clamp(tx/tz): tx itself inside the field of view, tz times the bound outside it.
                if -lim_x_neg < ux < lim_x_pos:
                    gtx += g_txc
                else:
                    gtz += g_txc * cux
                if -lim_y_neg < uy < lim_y_pos:
                    gty += g_tyc
                else:
                    gtz += g_tyc * cuy
                # means2d = (fx·tx/tz + cx, fy·ty/tz + cy).
                gtx += vmx * fx / tz
                gty += vmy * fy / tz
                gtz -= (vmx * fx * tx + vmy * fy * ty) / tz2
            # The camera-space centre t = Rv·p + t_v.
            gpx += V[0, 0] * gtx + V[1, 0] * gty + V[2, 0] * gtz
            gpy += V[0, 1] * gtx + V[1, 1] * gty + V[2, 1] * gtz
            gpz += V[0, 2] * gtx + V[1, 2] * gty + V[2, 2] * gtz
            if sh_degree < 0:
                continue
            vr, vg, vb = v_rgb[f, 0], v_rgb[f, 1], v_rgb[f, 2]
            if vr == _ZERO and vg == _ZERO and vb == _ZERO:
                continue
            dx, dy, dz = px - campos[c, 0], py - campos[c, 1], pz - campos[c, 2]
            dnorm = np.sqrt(dx * dx + dy * dy + dz * dz)
            dn = max(dnorm, _NORM_EPS)
            x, y, z = dx / dn, dy / dn, dz / dn
            # The colour as _project sums it, for the clamp at 0 (a gradient where colour + 0.5 >= 0).
            r, g, bl = _sh_colour(coeffs, n, sh_degree, x, y, z)
            vr = vr if r + _HALF >= _ZERO else _ZERO
            vg = vg if g + _HALF >= _ZERO else _ZERO
            vb = vb if bl + _HALF >= _ZERO else _ZERO
            # Each band: its coefficients' gradient, and its basis value's derivative along x, y, z.
            gx = gy = gz = _ZERO
            _band_backward(coeffs, g_coeffs, n, 0, _B[0], vr, vg, vb)
            if sh_degree >= 1:
                gy -= _B[1] * _band_backward(coeffs, g_coeffs, n, 1, -_B[1] * y, vr, vg, vb)
                gz += _B[1] * _band_backward(coeffs, g_coeffs, n, 2, _B[1] * z, vr, vg, vb)
                gx -= _B[1] * _band_backward(coeffs, g_coeffs, n, 3, -_B[1] * x, vr, vg, vb)
            if sh_degree >= 2:
                z2 = z * z
                fc1 = x * x - y * y
                fs1 = _TWO * x * y
                tb = _B[2] * z
                gk = _band_backward(coeffs, g_coeffs, n, 4, _B[3] * fs1, vr, vg, vb)
                gx += _TWO * _B[3] * y * gk
                gy += _TWO * _B[3] * x * gk
                gk = _band_backward(coeffs, g_coeffs, n, 5, tb * y, vr, vg, vb)
                gy += tb * gk
                gz += _B[2] * y * gk
                gk = _band_backward(coeffs, g_coeffs, n, 6, _B[4] * z2 - _B[5], vr, vg, vb)
                gz += _TWO * _B[4] * z * gk
                gk = _band_backward(coeffs, g_coeffs, n, 7, tb * x, vr, vg, vb)
                gx += tb * gk
                gz += _B[2] * x * gk
                gk = _band_backward(coeffs, g_coeffs, n, 8, _B[3] * fc1, vr, vg, vb)
                gx += _TWO * _B[3] * x * gk
                gy -= _TWO * _B[3] * y * gk
                if sh_degree >= 3:
                    tc = _B[6] * z2 + _B[7]
                    tb3 = _B[8] * z
                    fc2 = x * fc1 - y * fs1
                    fs2 = x * fs1 + y * fc1
                    d_sq = _THREE * (x * x - y * y)  # d fs2/dy = d fc2/dx
                    d_xy = _SIX * x * y              # d fs2/dx = -d fc2/dy
                    gk = _band_backward(coeffs, g_coeffs, n, 9, _B[9] * fs2, vr, vg, vb)
                    gx += _B[9] * d_xy * gk
                    gy += _B[9] * d_sq * gk
                    gk = _band_backward(coeffs, g_coeffs, n, 10, tb3 * fs1, vr, vg, vb)
                    gx += _TWO * tb3 * y * gk
                    gy += _TWO * tb3 * x * gk
                    gz += _B[8] * fs1 * gk
                    gk = _band_backward(coeffs, g_coeffs, n, 11, tc * y, vr, vg, vb)
                    gy += tc * gk
                    gz += _TWO * _B[6] * z * y * gk
                    gk = _band_backward(coeffs, g_coeffs, n, 12, z * (_B[10] * z2 - _B[11]), vr, vg, vb)
                    gz += (_THREE * _B[10] * z2 - _B[11]) * gk
                    gk = _band_backward(coeffs, g_coeffs, n, 13, tc * x, vr, vg, vb)
                    gx += tc * gk
                    gz += _TWO * _B[6] * z * x * gk
                    gk = _band_backward(coeffs, g_coeffs, n, 14, tb3 * fc1, vr, vg, vb)
                    gx += _TWO * tb3 * x * gk
                    gy -= _TWO * tb3 * y * gk
                    gz += _B[8] * fc1 * gk
                    gk = _band_backward(coeffs, g_coeffs, n, 15, _B[9] * fc2, vr, vg, vb)
                    gx += _B[9] * d_sq * gk
                    gy -= _B[9] * d_xy * gk
            gdx, gdy, gdz = _normalize_backward(gx, gy, gz, dx, dy, dz, dnorm)
            gpx += gdx
            gpy += gdy
            gpz += gdz
        g_means[n, 0], g_means[n, 1], g_means[n, 2] = gpx, gpy, gpz
        # M = R·diag(s).
        g_scales[n, 0] = gm00 * r00 + gm10 * r10 + gm20 * r20
        g_scales[n, 1] = gm01 * r01 + gm11 * r11 + gm21 * r21
        g_scales[n, 2] = gm02 * r02 + gm12 * r12 + gm22 * r22
        g00, g01, g02 = gm00 * sx, gm01 * sy, gm02 * sz
        g10, g11, g12 = gm10 * sx, gm11 * sy, gm12 * sz
        g20, g21, g22 = gm20 * sx, gm21 * sy, gm22 * sz
        # R(q) of the normalised quaternion, then the normalisation.
        gw = _TWO * (-qz * g01 + qy * g02 + qz * g10 - qx * g12 - qy * g20 + qx * g21)
        gx_ = _TWO * (qy * g01 + qz * g02 + qy * g10 - _TWO * qx * g11 - qw * g12 + qz * g20 + qw * g21
                      - _TWO * qx * g22)
        gy_ = _TWO * (-_TWO * qy * g00 + qx * g01 + qw * g02 + qx * g10 + qz * g12 - qw * g20 + qz * g21
                      - _TWO * qy * g22)
        gz_ = _TWO * (-_TWO * qz * g00 - qw * g01 + qx * g02 + qw * g10 - _TWO * qz * g11 + qy * g12 + qx * g20
                      + qy * g21)
        if qnorm < _NORM_EPS:
            g_quats[n, 0], g_quats[n, 1], g_quats[n, 2], g_quats[n, 3] = (
                gw / _NORM_EPS, gx_ / _NORM_EPS, gy_ / _NORM_EPS, gz_ / _NORM_EPS)
        else:
            dot = gw * qw + gx_ * qx + gy_ * qy + gz_ * qz
            g_quats[n, 0] = (gw - qw * dot) / qnorm
            g_quats[n, 1] = (gx_ - qx * dot) / qnorm
            g_quats[n, 2] = (gy_ - qy * dot) / qnorm
            g_quats[n, 3] = (gz_ - qz * dot) / qnorm
