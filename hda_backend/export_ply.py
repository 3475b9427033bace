"""Gaussians to standard 3D Gaussian Splatting ``.ply`` files (the INRIA layout common viewers read).

One binary little-endian PLY per frame, one ``vertex`` element per Gaussian with 62 float32
properties, in the order of the reference implementation (graphdeco-inria/gaussian-splatting,
``GaussianModel.save_ply``)::

    x y z  nx ny nz  f_dc_0..2  f_rest_0..44  opacity  scale_0..2  rot_0..3

- ``f_dc_c`` = SH coefficient 0 of colour channel c; ``f_rest`` is channel-major:
  ``f_rest_{c*15 + k-1}`` = SH coefficient k (1..15) of channel c. Our SH convention is gsplat's,
  which is the reference implementation's: the same real SH basis (same order, same signs), evaluated
  at the direction camera → Gaussian in world coordinates, colour = SH·basis + 0.5 clamped at 0.
  So the coefficients are written as they are.
- ``opacity`` is the logit of the opacity (viewers apply a sigmoid), clamped to [1e-6, 1 - 1e-6]
  first so a saturated float32 sigmoid stays finite; ``scale_i`` the log of the scales (viewers
  exponentiate); ``rot`` the unit quaternion w x y z; the normals are zero (unused by viewers).

Coordinate frame (``coords``): ``body`` writes the backend's coordinates as they are (metres, the
body frame: built-in motions +Y up, AMASS motions their own +Z up world); ``zup`` rotates +Y up to
+Z up, (x, y, z) → (x, −z, y), Blender's convention. Any rigid-plus-uniform-scale transform (e.g. a
Blender object's world matrix) can be applied with :func:`transform_gaussians`, which rotates the
means, the quaternions *and* the SH coefficients (view-dependent colour is a function of the world
direction, so it must turn with the Gaussians).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .atomic import write_bytes
from .avatar.gaussians import SH_COEFFS, Gaussians
from .errors import HDAError
from .ply_comments import comment_lines
from .render._projection import _sh_bases
from .rotations import matrix_to_quat, quat_multiply

SH_REST = SH_COEFFS - 1  # 15 coefficients per channel after the DC term
PROPERTIES: tuple[str, ...] = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2",
    *(f"f_rest_{i}" for i in range(3 * SH_REST)), "opacity", "scale_0", "scale_1", "scale_2",
    "rot_0", "rot_1", "rot_2", "rot_3",
)
OPACITY_EPS = 1e-6
COORDS = ("body", "zup")
# +Y up (the body frame) to +Z up (Blender): (x, y, z) -> (x, -z, y), a +90 degree turn about X.
YUP_TO_ZUP = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
MAX_GAUSSIANS = 50_000_000


def sh_rotation(rotation: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """The [K,K] matrix (K = (degree+1)^2) that turns SH coefficients with a rotation of the world.

    rotation: [3,3]. If f(d) = Σ_k c_k Y_k(d) is a colour as seen from direction d, the rotated world
    sees f'(d) = f(Rᵀd) = Σ_k c'_k Y_k(d) with c' = M c. Each band l maps onto itself, so M is block
    diagonal; each block is solved exactly (least squares over more directions than unknowns) from the
    basis itself, whatever its sign and order conventions.
    """
    rot = torch.as_tensor(rotation, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(64, 3, generator=gen, dtype=torch.float64), dim=-1)
    basis = _sh_bases(degree, dirs)  # [n,K]
    turned = _sh_bases(degree, dirs @ rot)  # rows: Y(Rᵀ d_i)
    k = (degree + 1) ** 2
    out = torch.zeros(k, k, dtype=torch.float64)
    for band in range(degree + 1):
        s = slice(band * band, (band + 1) ** 2)
        # turned[:, s] = basis[:, s] @ D  =>  c' = D c
        out[s, s] = torch.linalg.lstsq(basis[:, s], turned[:, s]).solution
    return out


def check_gaussians(g: Gaussians, source: str = "gaussians") -> None:
    """Refuse Gaussians a file must not hold: wrong shapes, NaN/inf, non-positive scales, opacity out of [0,1].

    g: one frame's Gaussians (no batch dim): means [M,3], quats [M,4], scales [M,3], opacities [M], sh [M,16,3].
    """
    m = g.means.shape[0] if g.means.dim() == 2 else -1
    shapes = {"means": (m, 3), "quats": (m, 4), "scales": (m, 3), "opacities": (m,), "sh": (m, SH_COEFFS, 3)}
    for name, shape in shapes.items():
        t = getattr(g, name)
        if tuple(t.shape) != shape or m < 0:
            raise HDAError(f"{source}: field '{name}' has shape {tuple(t.shape)}, expected {shape} "
                           "(one frame, no batch dimension)")
    if not 1 <= m <= MAX_GAUSSIANS:
        raise HDAError(f"{source}: {m} Gaussians, expected 1..{MAX_GAUSSIANS}")
    for name in shapes:
        t = getattr(g, name)
        bad = int((~torch.isfinite(t)).reshape(m, -1).any(-1).sum())
        if bad:
            raise HDAError(f"{source}: field '{name}' is NaN or inf for {bad} of {m} Gaussians, expected finite values")
    if bool((g.scales <= 0).any()):
        raise HDAError(f"{source}: field 'scales' has values <= 0, expected positive scales")
    if bool(((g.opacities < 0) | (g.opacities > 1)).any()):
        raise HDAError(f"{source}: field 'opacities' has values outside [0, 1]")
    if bool((g.quats.norm(dim=-1) < 1e-8).any()):
        raise HDAError(f"{source}: field 'quats' has zero-length quaternions, expected rotations")


def transform_gaussians(g: Gaussians, matrix: torch.Tensor) -> Gaussians:
    """Apply x ↦ A x + t (A = s·R, a rotation times a uniform scale s > 0) to one frame's Gaussians.

    matrix: [4,4] (or [3,4]). Means move, quaternions turn (q_R ⊗ q), scales grow by s, SH turn
    with R (:func:`sh_rotation`). A shear, mirror or non-uniform scale cannot be expressed by a
    Gaussian's scale and rotation alone, so it is refused.
    """
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    a, t = matrix[:3, :3], matrix[:3, 3]
    scale = torch.linalg.det(a).abs() ** (1.0 / 3.0)
    rot = a / scale if scale > 0 else a
    if scale <= 0 or torch.linalg.det(a) <= 0 or not torch.allclose(rot.T @ rot, torch.eye(3, dtype=torch.float64), atol=1e-4):
        raise HDAError(f"transform {a.tolist()}: expected a rotation times a uniform positive scale "
                       "(no mirror, shear or non-uniform scale)")
    dtype = g.means.dtype
    means = (g.means.double() @ a.T + t).to(dtype)
    q_rot = matrix_to_quat(rot[None]).to(dtype)
    quats = quat_multiply(q_rot.expand_as(g.quats), g.quats)
    turn = sh_rotation(rot).to(dtype)
    sh = torch.einsum("jk,mkc->mjc", turn, g.sh)
    return Gaussians(means, quats, g.scales * float(scale), g.opacities, sh)


def ply_rows(g: Gaussians, source: str = "gaussians") -> np.ndarray:
    """One frame's Gaussians as rows [M,62] float32 in :data:`PROPERTIES` order (values as stored)."""
    check_gaussians(g, source)
    m = g.means.shape[0]
    with torch.no_grad():
        opacity = g.opacities.double().clamp(OPACITY_EPS, 1 - OPACITY_EPS)
        rows = torch.cat([
            g.means.double(),
            torch.zeros(m, 3, dtype=torch.float64),
            g.sh[:, 0, :].double(),
            g.sh[:, 1:, :].double().transpose(1, 2).reshape(m, 3 * SH_REST),  # channel-major
            torch.log(opacity / (1 - opacity))[:, None],
            torch.log(g.scales.double()),
            torch.nn.functional.normalize(g.quats.double(), dim=-1),
        ], dim=1)
    out = rows.cpu().numpy().astype("<f4")
    if not np.isfinite(out).all():  # e.g. a scale below float32's range
        raise HDAError(f"{source}: values overflow float32 when written, expected scales in float32's range")
    return out


def ply_header(count: int, comments: dict[str, str] | None = None) -> bytes:
    """The header of a file of ``count`` Gaussians, with ``comments`` {name: one-line ASCII text}
    (hda_backend/ply_comments.py, which reads them back)."""
    lines = ["ply", "format binary_little_endian 1.0", *comment_lines(comments), f"element vertex {count}"]
    lines += [f"property float {name}" for name in PROPERTIES]
    lines += ["end_header"]
    return ("\n".join(lines) + "\n").encode("ascii")


def write_ply(path: str | os.PathLike, g: Gaussians, comments: dict[str, str] | None = None) -> Path:
    """Write one frame's Gaussians to ``path`` (atomically: a temporary file, then a rename), with
    ``comments`` in its header (see :func:`ply_header`)."""
    path = Path(path)
    rows = ply_rows(g, source=str(path))
    try:
        write_bytes(path, ply_header(rows.shape[0], comments) + rows.tobytes())
    except OSError as exc:
        raise HDAError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    return path


def parse_frames(spec: str | None, count: int) -> list[int]:
    """Frame indices of a motion with ``count`` frames: None (all), "N", or "A:B" (A..B-1, either may be
    omitted, like a Python slice)."""
    if spec is None:
        return list(range(count))
    text = spec.strip()
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            start, stop = int(a) if a.strip() else 0, int(b) if b.strip() else count
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise HDAError(f"--frames {spec!r}: expected N or A:B (0-based, B excluded)") from None
    if not 0 <= start < stop <= count:
        raise HDAError(f"--frames {spec!r}: expected 0 <= A < B <= {count} (the motion has {count} frames)")
    return list(range(start, stop))


def output_paths(out: str | os.PathLike, frames: list[int]) -> list[Path]:
    """Where each frame goes: ``out`` itself for one frame to a ``.ply`` name; ``<stem>_NNNN.ply`` beside it
    for several; ``out/frame_NNNN.ply`` when ``out`` is a folder (NNNN: the motion's frame index)."""
    out = Path(out)
    if out.suffix.lower() == ".ply":
        if len(frames) == 1:
            return [out]
        return [out.with_name(f"{out.stem}_{f:04d}.ply") for f in frames]
    return [out / f"frame_{f:04d}.ply" for f in frames]


def coords_matrix(coords: str) -> torch.Tensor | None:
    """[4,4] transform from the body frame for ``coords`` (see the module docstring); None for ``body``."""
    if coords not in COORDS:
        raise HDAError(f"--coords {coords!r}: expected one of {', '.join(COORDS)}")
    if coords == "body":
        return None
    matrix = torch.eye(4)
    matrix[:3, :3] = YUP_TO_ZUP
    return matrix


@torch.no_grad()
def export_frames(avatar, poses: torch.Tensor, transl: torch.Tensor, paths: list[Path],
                  matrix: torch.Tensor | None = None, progress: bool = False) -> list[Path]:
    """Pose the avatar, optionally transform, and write one ``.ply`` per frame.

    avatar: hda_backend.avatar.model.Avatar; poses [F,55,3]; transl [F,3]; paths: F output files;
    matrix: [4,4] applied to every frame (None: the body frame).
    """
    from tqdm import tqdm

    if len(paths) != poses.shape[0] or transl.shape[0] != poses.shape[0]:
        raise ValueError(f"{poses.shape[0]} poses, {transl.shape[0]} translations, {len(paths)} paths")
    device = next(avatar.parameters()).device
    poses, transl = poses.to(device), transl.to(device)
    written = []
    for f in tqdm(range(len(paths)), desc="export ply", unit="frame", disable=not progress):
        g = Gaussians(*(t.cpu() for t in avatar(poses[f:f + 1], transl[f:f + 1]).index(0)))  # written from the CPU
        if matrix is not None:
            g = transform_gaussians(g, matrix)
        written.append(write_ply(paths[f], g))
    return written
