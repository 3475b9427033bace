"""The per-frame fast path's numba kernels (``RealtimeAvatar`` on the CPU): UV pose maps and decoding.

- :func:`pose_maps_fused`: the posed template's vertices, normals and UV maps, what
  ``uvmap.pose_maps`` gives after the skinning transforms (its twin, with ``Avatar.pose_inputs``);
- :func:`decode_fused`: the Gaussians of one frame, what ``gaussians.decode`` gives (its twin).

Each is a few passes over vertices, faces or texels instead of dozens of PyTorch operations on
[V,...] or [M,...] tensors, whose fixed costs, not their arithmetic, were most of the 4-5 ms each of
these stages took in a 512² frame (README, Speed). Skinning weights are read sparsely
(:func:`sparse_weights`: a vertex blends at most a few of the 55 joints, a texel the joints of its three
corners). There is no backward: ``RealtimeAvatar`` runs them under ``torch.inference_mode``, and
``tests/test_realtime.py`` compares them with their twins. In float32, like the twins.

Importing this module needs numba; ``RealtimeAvatar`` uses the PyTorch code when it is missing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from ..render._projection_numba import _NORM_EPS, _TWO
from ..render._raster_numba import _F32, _ONE, _ZERO, _f32, _run_parallel
from ..body import BodyModel
from ..rotations import matrix_to_quat
from ..uvmap import UVLayout
from .gaussians import CHANNELS, SH_COEFFS, GaussianConfig, Gaussians, TexelBinding

_OFFSET, _LOG_SCALE, _QUAT, _OPACITY, _SH = (CHANNELS[k].start for k in ("offset", "log_scale", "quat", "opacity", "sh"))


@njit(inline="always")
def _blend_row(ids, weights, transforms, i, row):
    """Row ``row`` (0-2) of point i's blended skinning transform, Σ_k w_k T[id_k] (blend_transforms)."""
    a = b = c = d = _ZERO
    for k in range(ids.shape[1]):
        w, t = weights[i, k], transforms[ids[i, k], row]
        a += w * t[0]
        b += w * t[1]
        c += w * t[2]
        d += w * t[3]
    return a, b, c, d


@njit(inline="always")
def _blend(ids, weights, transforms, i):
    """The top three rows of point i's blended skinning transform, flattened (12 values)."""
    return (_blend_row(ids, weights, transforms, i, 0) + _blend_row(ids, weights, transforms, i, 1)
            + _blend_row(ids, weights, transforms, i, 2))


@njit(parallel=True, cache=True)
def _pose_maps(v_rest, transforms, root, vertex_ids, vertex_weights, faces, face_start, vertex_faces, corners,
               bary, texels, vertices, flat):
    n_vertices, n_faces = v_rest.shape[0], faces.shape[0]
    for v in prange(n_vertices):  # skin_points
        r00, r01, r02, r03, r10, r11, r12, r13, r20, r21, r22, r23 = _blend(vertex_ids, vertex_weights, transforms, v)
        x, y, z = v_rest[v, 0], v_rest[v, 1], v_rest[v, 2]
        vertices[v, 0] = r00 * x + r01 * y + r02 * z + r03
        vertices[v, 1] = r10 * x + r11 * y + r12 * z + r13
        vertices[v, 2] = r20 * x + r21 * y + r22 * z + r23
    face_normals = np.empty((n_faces, 3), dtype=np.float32)
    for f in prange(n_faces):  # area-weighted: the cross product of two edges
        a, b, c = faces[f, 0], faces[f, 1], faces[f, 2]
        e1x, e1y, e1z = vertices[b, 0] - vertices[a, 0], vertices[b, 1] - vertices[a, 1], vertices[b, 2] - vertices[a, 2]
        e2x, e2y, e2z = vertices[c, 0] - vertices[a, 0], vertices[c, 1] - vertices[a, 1], vertices[c, 2] - vertices[a, 2]
        face_normals[f, 0] = e1y * e2z - e1z * e2y
        face_normals[f, 1] = e1z * e2x - e1x * e2z
        face_normals[f, 2] = e1x * e2y - e1y * e2x
    normals = np.empty((n_vertices, 3), dtype=np.float32)
    for v in prange(n_vertices):  # each vertex sums its faces (a CSR list), then unit length
        sx = sy = sz = _ZERO
        for i in range(face_start[v], face_start[v + 1]):
            f = vertex_faces[i]
            sx += face_normals[f, 0]
            sy += face_normals[f, 1]
            sz += face_normals[f, 2]
        n = max(np.sqrt(sx * sx + sy * sy + sz * sz), _NORM_EPS)
        normals[v, 0], normals[v, 1], normals[v, 2] = sx / n, sy / n, sz / n
    for m in prange(corners.shape[0]):  # interpolate at the texels; positions relative to the root joint
        nx = ny = nz = px = py = pz = _ZERO
        for k in range(3):
            v, w = corners[m, k], bary[m, k]
            nx += normals[v, 0] * w
            ny += normals[v, 1] * w
            nz += normals[v, 2] * w
            px += (vertices[v, 0] - root[0]) * w
            py += (vertices[v, 1] - root[1]) * w
            pz += (vertices[v, 2] - root[2]) * w
        n = max(np.sqrt(nx * nx + ny * ny + nz * nz), _NORM_EPS)
        t = texels[m]
        flat[t, 0], flat[t, 1], flat[t, 2] = nx / n, ny / n, nz / n
        flat[t, 3], flat[t, 4], flat[t, 5] = px, py, pz


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
        r00, r01, r02, r03, r10, r11, r12, r13, r20, r21, r22, r23 = _blend(joint_ids, joint_weights, transforms, m)
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


class FrameKernels:
    """The kernels with what they read of one avatar's body, UV layout and texel binding, prepared once.

    body: the avatar's BodyModel; layout: its UVLayout; binding: its TexelBinding (CPU tensors).
    """

    def __init__(self, body: BodyModel, layout: UVLayout, binding: TexelBinding):
        self.vertex_weights = sparse_weights(body.weights)
        faces = body.faces.numpy().astype(np.int64)
        self.faces = np.ascontiguousarray(faces)
        # Vertex -> faces as CSR lists: each vertex sums its own faces' normals (no scatter in parallel).
        corner_vertex = faces.reshape(-1)
        self.vertex_faces = np.ascontiguousarray(np.argsort(corner_vertex, kind="stable") // 3)
        counts = np.bincount(corner_vertex, minlength=body.v_template.shape[0])
        self.face_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.map_corners = np.ascontiguousarray(body.faces[layout.texel_faces()].numpy().astype(np.int64))
        self.map_bary = _f32(layout.texel_bary())
        self.texels = np.ascontiguousarray(layout.texels.numpy().astype(np.int64))
        self.res = layout.res
        self.texel_weights = sparse_weights(binding.weights)
        self.corners = np.ascontiguousarray(binding.corners.numpy().astype(np.int64))
        self.bary = _f32(binding.bary)
        self.tbn = _f32(binding.tbn)
        self.base_log_scale = _f32(binding.base_log_scale)

    def pose_maps(self, v_rest: torch.Tensor, transforms: torch.Tensor, root: torch.Tensor):
        """v_rest [V,3] rest vertices (with pose correctives), transforms [55,4,4] skinning transforms,
        root [3] the posed root joint -> (vertices [V,3] posed by LBS, maps [1,6,R,R] in channels-last
        memory: unit normals, then root-relative positions, zero outside the atlas), as
        ``uvmap.pose_maps`` (with ``skin_points`` and ``vertex_normals``)."""
        vertices = torch.empty(v_rest.shape[0], 3)
        flat = torch.zeros(self.res * self.res, 6)
        _run_parallel(_pose_maps, _f32(v_rest), _f32(transforms), _f32(root), *self.vertex_weights, self.faces,
                      self.face_start, self.vertex_faces, self.map_corners, self.map_bary, self.texels,
                      vertices.numpy(), flat.numpy(), tiles_per_chunk=0)
        return vertices, flat.reshape(1, self.res, self.res, 6).permute(0, 3, 1, 2)

    def decode(self, raw: torch.Tensor, rest_vertices: torch.Tensor, transforms: torch.Tensor,
               config: GaussianConfig) -> Gaussians:
        """``decode(raw, binding, rest_vertices, transforms, config).index(0)`` for one frame: raw
        [1,M,59], rest_vertices [1,V,3], transforms [1,55,4,4] -> Gaussians without the batch
        dimension (means [M,3], quats [M,4], scales [M,3], opacities [M], sh [M,16,3])."""
        m = raw.shape[1]
        out = Gaussians(torch.empty(m, 3), torch.empty(m, 4), torch.empty(m, 3), torch.empty(m),
                        torch.empty(m, SH_COEFFS, 3))
        outer = np.zeros(4, dtype=np.float32)
        if not config.skin_rotations:  # the global orientation only, the same for every texel (as decode)
            outer = _f32(matrix_to_quat(transforms[0, 0, :3, :3].float()))
        logit = math.log(config.init_opacity / (1.0 - config.init_opacity))
        _run_parallel(_decode, _f32(raw[0]), _f32(rest_vertices[0]), self.corners, self.bary, *self.texel_weights,
                      _f32(transforms[0]), self.tbn, self.base_log_scale, _F32(config.offset_scale), _F32(logit),
                      config.skin_rotations, outer, (config.sh_degree + 1) ** 2, *(t.numpy() for t in out),
                      tiles_per_chunk=0)
        return out
