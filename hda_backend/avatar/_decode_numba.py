"""Decoding (paper Eq. 7) as one numba kernel: the per-frame fast path's twin of ``gaussians.decode``.

:func:`decode_fused` gives what :func:`~hda_backend.avatar.gaussians.decode` gives for one frame, in
one pass over the texels instead of about sixty PyTorch operations on [M,...] tensors, whose fixed
costs, not their arithmetic, were most of the decode's 4 ms in a 512² frame (README, Speed). The
skinning weights are read sparsely (:func:`sparse_weights`: a texel blends the weights of its three
corner vertices, so at most a dozen of the 55 joints count). No backward: ``RealtimeAvatar`` uses it
under ``torch.inference_mode`` only, and ``tests/test_realtime.py`` compares it with ``decode``.

Importing this module needs numba; ``RealtimeAvatar`` uses ``decode`` itself when it is missing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from ..render._raster_numba import _run_parallel
from ..rotations import matrix_to_quat
from .gaussians import CHANNELS, SH_COEFFS, GaussianConfig, Gaussians, TexelBinding

_F32 = np.float32
_ZERO, _ONE, _TWO = _F32(0.0), _F32(1.0), _F32(2.0)
_NORM_EPS = _F32(1e-12)  # F.normalize's eps, as decode uses it
_OFFSET, _LOG_SCALE, _QUAT, _OPACITY, _SH = (CHANNELS[k].start for k in ("offset", "log_scale", "quat", "opacity", "sh"))


def sparse_weights(weights: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """weights [M,J] -> (joint ids [M,K] int64, their weights [M,K] float32), K the most non-zero weights
    of any row; rows with fewer are padded with weight 0 (which adds exactly nothing)."""
    k = max(1, int((weights != 0).sum(1).max()))
    values, ids = torch.topk(weights.float(), k, dim=1)
    return np.ascontiguousarray(ids.numpy()), np.ascontiguousarray(values.numpy())


@njit(inline="always")
def _quat_multiply(aw, ax, ay, az, bw, bx, by, bz):
    """Hamilton product a ⊗ b, as rotations.quat_multiply."""
    return (aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw)


@njit(inline="always")
def _matrix_to_quat(m00, m01, m02, m10, m11, m12, m20, m21, m22):
    """rotations.matrix_to_quat: Shepperd's method on the largest diagonal term, normalised, w ≥ 0."""
    b0 = _ONE + m00 + m11 + m22
    b1 = _ONE + m00 - m11 - m22
    b2 = _ONE - m00 + m11 - m22
    b3 = _ONE - m00 - m11 + m22
    best = max(b0, b1, b2, b3)  # the first of equal terms, as torch.argmax takes it
    if b0 == best:
        w, x, y, z = b0, m21 - m12, m02 - m20, m10 - m01
    elif b1 == best:
        w, x, y, z = m21 - m12, b1, m01 + m10, m02 + m20
    elif b2 == best:
        w, x, y, z = m02 - m20, m01 + m10, b2, m12 + m21
    else:
        w, x, y, z = m10 - m01, m02 + m20, m12 + m21, b3
    n = max(np.sqrt(w * w + x * x + y * y + z * z), _NORM_EPS)
    w, x, y, z = w / n, x / n, y / n, z / n
    if w < _ZERO:
        return -w, -x, -y, -z
    return w, x, y, z


@njit(parallel=True, cache=True)
def _decode(raw, rest, corners, bary, joint_ids, joint_weights, transforms, tbn, base_log_scale,
            offset_scale, logit, skin_rotations, outer, n_sh, means, quats, scales, opacities, sh):
    for m in prange(raw.shape[0]):
        cx = _ZERO
        cy = _ZERO
        cz = _ZERO
        for k in range(3):
            v, b = corners[m, k], bary[m, k]
            cx += rest[v, 0] * b
            cy += rest[v, 1] * b
            cz += rest[v, 2] * b
        cx += offset_scale * raw[m, _OFFSET]
        cy += offset_scale * raw[m, _OFFSET + 1]
        cz += offset_scale * raw[m, _OFFSET + 2]
        # The blended transform's top three rows, r0 | r1 | r2 (blend_transforms, its sparse terms).
        r00 = r01 = r02 = r03 = r10 = r11 = r12 = r13 = r20 = r21 = r22 = r23 = _ZERO
        for k in range(joint_ids.shape[1]):
            w, t = joint_weights[m, k], transforms[joint_ids[m, k]]
            r00 += w * t[0, 0]
            r01 += w * t[0, 1]
            r02 += w * t[0, 2]
            r03 += w * t[0, 3]
            r10 += w * t[1, 0]
            r11 += w * t[1, 1]
            r12 += w * t[1, 2]
            r13 += w * t[1, 3]
            r20 += w * t[2, 0]
            r21 += w * t[2, 1]
            r22 += w * t[2, 2]
            r23 += w * t[2, 3]
        means[m, 0] = r00 * cx + r01 * cy + r02 * cz + r03
        means[m, 1] = r10 * cx + r11 * cy + r12 * cz + r13
        means[m, 2] = r20 * cx + r21 * cy + r22 * cz + r23
        for e in range(3):
            scales[m, e] = np.exp(raw[m, _LOG_SCALE + e] + base_log_scale[m, e])
        lw, lx, ly, lz = raw[m, _QUAT] + _ONE, raw[m, _QUAT + 1], raw[m, _QUAT + 2], raw[m, _QUAT + 3]
        n = max(np.sqrt(lw * lw + lx * lx + ly * ly + lz * lz), _NORM_EPS)
        lw, lx, ly, lz = lw / n, lx / n, ly / n, lz / n
        if skin_rotations:
            ow, ox, oy, oz = _matrix_to_quat(r00, r01, r02, r10, r11, r12, r20, r21, r22)
        else:
            ow, ox, oy, oz = outer[0], outer[1], outer[2], outer[3]
        tw, tx, ty, tz = _quat_multiply(tbn[m, 0], tbn[m, 1], tbn[m, 2], tbn[m, 3], lw, lx, ly, lz)
        quats[m, 0], quats[m, 1], quats[m, 2], quats[m, 3] = _quat_multiply(ow, ox, oy, oz, tw, tx, ty, tz)
        opacities[m] = _ONE / (_ONE + np.exp(-(raw[m, _OPACITY] + logit)))
        for c in range(sh.shape[1]):
            for ch in range(3):
                sh[m, c, ch] = raw[m, _SH + 3 * c + ch] if c < n_sh else _ZERO


def decode_fused(raw: torch.Tensor, binding: TexelBinding, sparse: tuple[np.ndarray, np.ndarray],
                 rest_vertices: torch.Tensor, transforms: torch.Tensor, config: GaussianConfig) -> Gaussians:
    """``decode(raw, binding, rest_vertices, transforms, config).index(0)``, one frame, float32 CPU.

    raw: [1,M,59]; sparse: :func:`sparse_weights` of ``binding.weights``; rest_vertices: [1,V,3];
    transforms: [1,55,4,4] -> Gaussians without the batch dimension (means [M,3], quats [M,4],
    scales [M,3], opacities [M], sh [M,16,3]).
    """
    m = raw.shape[1]
    out = Gaussians(torch.empty(m, 3), torch.empty(m, 4), torch.empty(m, 3), torch.empty(m),
                    torch.empty(m, SH_COEFFS, 3))
    outer = np.zeros(4, dtype=np.float32)
    if not config.skin_rotations:  # the global orientation only, the same for every texel (as decode)
        outer = matrix_to_quat(transforms[0, 0, :3, :3].float()).numpy()

    def f32(t):
        return np.ascontiguousarray(t.detach().to(torch.float32).numpy())

    logit = math.log(config.init_opacity / (1.0 - config.init_opacity))
    _run_parallel(_decode, f32(raw[0]), f32(rest_vertices[0]), binding.corners.numpy(), f32(binding.bary),
                  sparse[0], sparse[1], f32(transforms[0]), f32(binding.tbn), f32(binding.base_log_scale),
                  _F32(config.offset_scale), _F32(logit), config.skin_rotations, outer,
                  (config.sh_degree + 1) ** 2, *(t.numpy() for t in out), tiles_per_chunk=0)
    return out
