"""EWA projection and SH colours fused into one numba kernel: the rasterizer's fast path without autograd.

:func:`project_and_shade` gives what ``_projection.project_gaussians`` (with opacities) and
``_projection.spherical_harmonics`` (+0.5, clamped at 0) give, its slow, obviously correct twins, in one
pass over the Gaussians instead of about a hundred PyTorch operations on [C,N] tensors: for one avatar
(10^4 Gaussians) the operations' fixed costs, not the arithmetic, were 3.3 ms of a 512² frame
(README, Speed). It has no backward, so ``rasterize`` uses it only when no input needs a gradient (the
add-on's frames, previews and evaluation; fits keep the twins). Every step is the twin's, in the twin's
order and in float32 (``tests/test_rasterize.py`` compares both).

Importing this module needs numba; ``rasterize`` falls back to the twins when it is missing.
"""

from __future__ import annotations

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


@njit(inline="always")
def _row(V, i, m0, m1, m2):
    """Row i of Rv·M, for one column of M (m0, m1, m2)."""
    return V[i, 0] * m0 + V[i, 1] * m1 + V[i, 2] * m2


@njit(inline="always")
def _add_band(coeffs, n, k, basis, r, g, b):
    """The colour so far (r, g, b) plus one SH basis value times Gaussian n's coefficient k."""
    return r + basis * coeffs[n, k, 0], g + basis * coeffs[n, k, 1], b + basis * coeffs[n, k, 2]


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
        x, y, z = dx / dn, dy / dn, dz / dn
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
        rgb[f, 0], rgb[f, 1], rgb[f, 2] = max(r + _HALF, _ZERO), max(g + _HALF, _ZERO), max(bl + _HALF, _ZERO)


def project_and_shade(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                      sh_degree: int | None, eps2d: float, near_plane: float, far_plane: float):
    """``project_gaussians(..., opacities=opacities)`` and, with ``sh_degree``, the SH colours, in one kernel.

    Args:
        means: [N,3]; quats: [N,4] wxyz (any norm); scales: [N,3]; opacities: [N]; colors: [N,K,3] SH
            coefficients when ``sh_degree`` is set (else unused); viewmats: [C,4,4]; Ks: [C,3,3]: as
            ``rasterize`` takes them, CPU tensors.
        sh_degree: None, or 0..3.

    Returns:
        radii [C,N,2] int32, means2d [C,N,2], depths [C,N], conics [C,N,3] (float32, as the twin), and
        rgb [C,N,3] = max(0, SH colour + 0.5) towards each camera, or None without ``sh_degree``.
    """
    C, N = viewmats.shape[0], means.shape[0]
    radii = np.empty((C * N, 2), dtype=np.int32)
    means2d = np.empty((C * N, 2), dtype=np.float32)
    depths = np.empty(C * N, dtype=np.float32)
    conics = np.empty((C * N, 3), dtype=np.float32)
    shaded = sh_degree is not None
    rgb = np.empty((C * N if shaded else 0, 3), dtype=np.float32)
    campos = _f32(torch.linalg.inv(viewmats)[:, :3, 3])
    coeffs = _f32(colors) if shaded else np.zeros((0, 1, 3), dtype=np.float32)
    _run_parallel(_project, _f32(means), _f32(quats), _f32(scales), _f32(opacities), _f32(viewmats),
                  _f32(Ks), width, height, _F32(eps2d), _F32(near_plane), _F32(far_plane), campos, coeffs,
                  -1 if sh_degree is None else sh_degree, radii, means2d, depths, conics, rgb,
                  tiles_per_chunk=0)
    out = [torch.from_numpy(radii).reshape(C, N, 2), torch.from_numpy(means2d).reshape(C, N, 2),
           torch.from_numpy(depths).reshape(C, N), torch.from_numpy(conics).reshape(C, N, 3)]
    return (*out, torch.from_numpy(rgb).reshape(C, N, 3) if shaded else None)
