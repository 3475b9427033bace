"""UV pose maps: the paper's inverse texture mapping (§4.1).

Conventions (fixed here, used everywhere):
- A UV map of resolution R is an image with R rows and R columns. Texel (row i, column j) has its centre
  at u = (j + 0.5) / R, v = 1 - (i + 0.5) / R: row 0 is the top of the texture (v near 1), as texture
  images are stored, so a map saved as PNG lines up with the atlas in Blender's UV editor.
- Each texel belongs to the first UV triangle (lowest face index) that contains its centre; its
  barycentric weights are taken in UV space, against ``ft``, and applied to 3D attributes through ``f``
  (same face order), so seams, where one vertex has several UVs, are handled.
- Position maps are in the pelvis frame: the mean template (beta = 0, psi = 0) is posed with the global
  orientation and translation removed, and the pelvis joint is subtracted. The UNet input is therefore
  the same wherever the avatar stands and whichever way it faces; global motion is applied only when
  the Gaussians are skinned.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from smplx.lbs import batch_rodrigues

from .atomic import replacing
from .body import BodyModel, PosedBody, pose_body, vertex_normals
from .devices import map_tensors
from .errors import HDAError

UV_RESOLUTIONS = (32, 64, 128, 256, 512)


@dataclass(frozen=True)
class UVLayout:
    """Texel-to-surface lookup for one (body, resolution).

    face_id [R,R] int64 (-1 where no face); bary [R,R,3] float32; mask [R,R] bool;
    texels [M] flat indices (row * R + col) of covered texels, in row-major order.
    """

    res: int
    face_id: torch.Tensor
    bary: torch.Tensor
    mask: torch.Tensor
    texels: torch.Tensor

    def apply(self, fn) -> "UVLayout":
        """The same layout with ``fn`` applied to every tensor (``Avatar.to`` moves it this way)."""
        return map_tensors(self, fn)

    @property
    def num_texels(self) -> int:
        return int(self.texels.numel())

    def texel_faces(self) -> torch.Tensor:
        """[M] face index of each covered texel."""
        return self.face_id.reshape(-1)[self.texels]

    def texel_bary(self) -> torch.Tensor:
        """[M,3] barycentric weights of each covered texel."""
        return self.bary.reshape(-1, 3)[self.texels]


def texel_centres(res: int) -> np.ndarray:
    """[R,R,2] (u, v) of every texel centre, following the module's row/v-flip convention."""
    centres = (np.arange(res, dtype=np.float64) + 0.5) / res
    u = np.broadcast_to(centres[None, :], (res, res))
    v = np.broadcast_to(1.0 - centres[:, None], (res, res))
    return np.stack([u, v], axis=-1)


def rasterize_uv(vt: np.ndarray, ft: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray]:
    """Assign texels to UV triangles.

    vt: [T,2] UV coordinates; ft: [F,3] UV faces; returns face_id [R,R] (-1 empty), bary [R,R,3].
    """
    vt = np.asarray(vt, dtype=np.float64)
    tri = vt[np.asarray(ft, dtype=np.int64)]  # [F,3,2]
    face_id = np.full((res, res), -1, dtype=np.int64)
    bary = np.zeros((res, res, 3), dtype=np.float64)
    # Texel centre of column j is u = (j+0.5)/R, of row i is v = 1-(i+0.5)/R; invert for the bounding box.
    col_lo = np.clip(np.ceil(tri[..., 0].min(1) * res - 0.5), 0, res).astype(np.int64)
    col_hi = np.clip(np.floor(tri[..., 0].max(1) * res - 0.5), -1, res - 1).astype(np.int64)
    row_lo = np.clip(np.ceil((1.0 - tri[..., 1].max(1)) * res - 0.5), 0, res).astype(np.int64)
    row_hi = np.clip(np.floor((1.0 - tri[..., 1].min(1)) * res - 0.5), -1, res - 1).astype(np.int64)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    det = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    eps = 1e-9
    # Highest face first so that, written last, the lowest face index wins a shared texel.
    for fi in np.nonzero((col_hi >= col_lo) & (row_hi >= row_lo) & (np.abs(det) > 1e-20))[0][::-1]:
        rows = np.arange(row_lo[fi], row_hi[fi] + 1)
        cols = np.arange(col_lo[fi], col_hi[fi] + 1)
        u = ((cols + 0.5) / res)[None, :]
        v = (1.0 - (rows + 0.5) / res)[:, None]
        l0 = ((b[fi, 1] - c[fi, 1]) * (u - c[fi, 0]) + (c[fi, 0] - b[fi, 0]) * (v - c[fi, 1])) / det[fi]
        l1 = ((c[fi, 1] - a[fi, 1]) * (u - c[fi, 0]) + (a[fi, 0] - c[fi, 0]) * (v - c[fi, 1])) / det[fi]
        l2 = 1.0 - l0 - l1
        inside = (l0 >= -eps) & (l1 >= -eps) & (l2 >= -eps)
        if not inside.any():
            continue
        rr, cc = np.nonzero(inside)
        face_id[rows[rr], cols[cc]] = fi
        bary[rows[rr], cols[cc]] = np.stack([l0[rr, cc], l1[rr, cc], l2[rr, cc]], -1)
    bary = np.clip(bary, 0.0, 1.0)
    bary /= np.maximum(bary.sum(-1, keepdims=True), 1e-12)
    return face_id, bary.astype(np.float32)


def _cache_dir() -> Path:
    return Path(os.environ.get("HDA_CACHE_DIR") or Path.home() / ".cache" / "hda")


def uv_layout(body: BodyModel, res: int, cache: bool = True) -> UVLayout:
    """The UV layout of ``body`` at ``res`` texels per side, computed once and cached on disk.

    The cache file is keyed by the body's fingerprint and written atomically; an unreadable cache file
    is recomputed and replaced.
    """
    if res not in UV_RESOLUTIONS:
        raise HDAError(f"uv resolution {res}: expected one of {', '.join(map(str, UV_RESOLUTIONS))}")
    path = _cache_dir() / f"uv_{body.sha256[:16]}_{res}.npz"
    face_id = bary = None
    if cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                face_id, bary = data["face_id"], data["bary"]
            if face_id.shape != (res, res) or bary.shape != (res, res, 3):
                face_id = bary = None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            face_id = bary = None
    if face_id is None:
        face_id, bary = rasterize_uv(body.vt.numpy(), body.ft.numpy(), res)
        if cache:
            _atomic_savez(path, face_id=face_id, bary=bary)
    face_id_t = torch.from_numpy(face_id)
    mask = face_id_t >= 0
    if not mask.any():
        raise HDAError(f"body model {body.path}: its UV atlas covers no texel at resolution {res}; "
                       "expected vt in [0, 1] with non-degenerate ft triangles")
    return UVLayout(res, face_id_t, torch.from_numpy(bary), mask, torch.nonzero(mask.reshape(-1))[:, 0])


def _atomic_savez(path: Path, **arrays) -> None:
    try:
        with replacing(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    except OSError:
        pass  # a read-only cache only costs recomputation


def interpolate(layout: UVLayout, faces: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Barycentric interpolation of per-vertex values at the covered texels.

    faces: [F,3] vertex faces (f, not ft); values: [B,V,C] -> [B,M,C].
    """
    corners = faces[layout.texel_faces()]  # [M,3]
    bary = layout.texel_bary().to(values)
    return torch.einsum("bmkc,mk->bmc", values[:, corners], bary)


def scatter(layout: UVLayout, texel_values: torch.Tensor) -> torch.Tensor:
    """Write texel values [B,M,C] into maps [B,C,R,R], zero where no face covers a texel."""
    batch, _, channels = texel_values.shape
    maps = texel_values.new_zeros(batch, channels, layout.res * layout.res)
    maps[:, :, layout.texels.to(texel_values.device)] = texel_values.transpose(1, 2)
    return maps.reshape(batch, channels, layout.res, layout.res)


def local_pose(pose: torch.Tensor) -> torch.Tensor:
    """The pose with its global orientation removed: [B,55,3] -> [B,55,3]."""
    local = pose.clone()
    local[:, 0] = 0.0
    return local


def pose_maps(body: BodyModel, layout: UVLayout, pose: torch.Tensor) -> tuple[torch.Tensor, PosedBody]:
    """Position and normal maps of the posed mean template, the avatar UNet's input.

    pose: [B,55,3] axis-angle (global orientation ignored). Returns maps [B,6,R,R] (normal xyz, then
    pelvis-relative position xyz, in metres; zero outside the atlas) and the pose of the template with
    its global orientation removed (its transforms skin the Gaussians, see :func:`global_transform`).
    """
    posed = pose_body(body, local_pose(pose))
    positions = posed.vertices - posed.joints[:, :1]
    normals = vertex_normals(posed.vertices, body.faces)
    texel_pos = interpolate(layout, body.faces, positions)
    texel_nrm = torch.nn.functional.normalize(interpolate(layout, body.faces, normals), dim=-1, eps=1e-12)
    return scatter(layout, torch.cat([texel_nrm, texel_pos], dim=-1)), posed


def global_transform(body: BodyModel, pose: torch.Tensor, transl: torch.Tensor | None) -> torch.Tensor:
    """[B,4,4] rigid transform that puts a pose-without-global-orientation into the world.

    SMPL-X rotates the whole body about the rest pelvis joint J0, then translates:
    G = [R0 | J0 - R0 J0 + transl], so transforms(pose) = G @ transforms(local_pose(pose)).
    """
    rot = batch_rodrigues(pose[:, 0].reshape(-1, 3))
    pelvis = body.rest_joints()[0].to(pose)
    g = torch.eye(4, dtype=pose.dtype, device=pose.device).repeat(pose.shape[0], 1, 1)
    g[:, :3, :3] = rot
    g[:, :3, 3] = pelvis - rot @ pelvis
    if transl is not None:
        g[:, :3, 3] += torch.as_tensor(transl, dtype=pose.dtype, device=pose.device).reshape(-1, 3)
    return g
