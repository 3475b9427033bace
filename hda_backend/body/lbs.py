"""Functional posing of an SMPL-X-format body (pure functions, no state).

Built on smplx's own LBS building blocks. Unlike ``smplx.lbs.lbs`` it also returns the per-joint
rigid transforms, which skinning Gaussians needs, and the unskinned rest vertices (template + shape +
pose correctives), on which the Gaussians of an avatar sit.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from smplx.lbs import batch_rigid_transform, batch_rodrigues, blend_shapes, vertices2joints

from ..errors import HDAError
from .model import BodyModel
from .skeleton import NUM_JOINTS, PARENTS

_PARENTS = np.asarray(PARENTS, dtype=np.int64)  # every loaded body has this tree (model.py checks kintree_table)


class PosedBody(NamedTuple):
    """vertices [B,V,3] posed; joints [B,55,3] posed; transforms [B,55,4,4] mapping rest-space points
    (after shape and pose correctives) to posed space, translation included; rest_vertices [B,V,3]."""

    vertices: torch.Tensor
    joints: torch.Tensor
    transforms: torch.Tensor
    rest_vertices: torch.Tensor


def check_pose(pose, source: str = "pose") -> torch.Tensor:
    """Validate an axis-angle pose and return it as float32 [B,55,3].

    Accepts [55,3], [165], [B,55,3] or [B,165] (SMPL-X order: global_orient, body, jaw, eyes, hands).
    """
    pose = torch.as_tensor(pose, dtype=torch.float32)
    if pose.ndim in (1, 2) and pose.shape[-1] == 3 * NUM_JOINTS:
        pose = pose.reshape(-1, NUM_JOINTS, 3)
    elif pose.ndim == 2 and pose.shape == (NUM_JOINTS, 3):
        pose = pose[None]
    elif not (pose.ndim == 3 and pose.shape[1:] == (NUM_JOINTS, 3)):
        raise HDAError(f"{source}: shape {tuple(pose.shape)}, expected (55, 3), (165,), (B, 55, 3) or (B, 165) "
                       "axis-angle in SMPL-X joint order")
    # A meta tensor (the CPU-side device tests) carries no values to check.
    if not pose.is_meta and not torch.isfinite(pose).all():
        raise HDAError(f"{source}: contains NaN or inf, expected finite axis-angle values")
    return pose


def pose_body(body: BodyModel, pose: torch.Tensor, betas: torch.Tensor | None = None,
              transl: torch.Tensor | None = None) -> PosedBody:
    """Pose the body with linear blend skinning.

    pose: [B,55,3] axis-angle (see :func:`check_pose`); betas: [B,nb] shape coefficients, nb ≤ body's
    (None: the mean shape); transl: [B,3] global translation (None: zero).
    """
    joints, transforms, v_rest = pose_transforms(body, pose, betas, transl)
    vertices = skin_points(v_rest, body.weights.to(v_rest.device), transforms)
    return PosedBody(vertices, joints, transforms, v_rest)


def pose_transforms(body: BodyModel, pose: torch.Tensor, betas: torch.Tensor | None = None,
                    transl: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`pose_body` without skinning the vertices: (joints [B,55,3], transforms [B,55,4,4], rest
    vertices [B,V,3]), for a caller that skins them itself (the per-frame fast path)."""
    pose = check_pose(pose)
    batch, device = pose.shape[0], pose.device
    v_template = body.v_template.to(device)
    v_shaped = v_template.expand(batch, -1, -1)
    if betas is not None:
        betas = torch.as_tensor(betas, dtype=torch.float32, device=device).reshape(batch, -1)
        if betas.shape[1] > body.num_betas:
            raise HDAError(f"betas: {betas.shape[1]} values, expected at most {body.num_betas} for body {body.body_id}")
        v_shaped = v_template + blend_shapes(betas, body.shapedirs[:, :, : betas.shape[1]].to(device))
    if betas is None:  # the mean shape's rest joints, regressed once per body (55×V, 1.5 ms a frame)
        joints_rest = body.rest_joints().to(device).expand(batch, -1, -1)
    else:
        joints_rest = vertices2joints(body.J_regressor.to(device), v_shaped)
    rot_mats = batch_rodrigues(pose.reshape(-1, 3)).reshape(batch, NUM_JOINTS, 3, 3)
    v_rest = v_shaped
    if body.posedirs is not None:
        eye = torch.eye(3, device=device)
        pose_feature = (rot_mats[:, 1:] - eye).reshape(batch, -1)
        v_rest = v_shaped + (pose_feature @ body.posedirs.to(device)).reshape(batch, -1, 3)
    # The kinematic tree as host integers: smplx walks it joint by joint (``chain[parents[i]]``), and a
    # device tensor there would read one value back per joint (a GPU sync each).
    joints, transforms = batch_rigid_transform(rot_mats, joints_rest, _PARENTS)
    if transl is not None:
        transl = torch.as_tensor(transl, dtype=torch.float32, device=device).reshape(batch, 3)
        joints = joints + transl[:, None]
        transforms = transforms.clone()
        transforms[:, :, :3, 3] += transl[:, None]
    return joints, transforms, v_rest


def skin_points(points: torch.Tensor, weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Linear blend skinning of rest-space points.

    points: [B,N,3]; weights: [N,J]; transforms: [B,J,4,4] -> [B,N,3].
    """
    blended = blend_transforms(weights, transforms)
    return torch.einsum("bnij,bnj->bni", blended[..., :3, :3], points) + blended[..., :3, 3]


def blend_transforms(weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Per-point skinning matrices: weights [N,J], transforms [B,J,4,4] -> [B,N,4,4]."""
    batch, joints = transforms.shape[:2]
    return (weights @ transforms.reshape(batch, joints, 16)).reshape(batch, -1, 4, 4)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals: vertices [B,V,3], faces [F,3] -> [B,V,3]."""
    v0, v1, v2 = (vertices[:, faces[:, k]] for k in range(3))
    face_n = torch.cross(v1 - v0, v2 - v0, dim=-1)
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals.index_add_(1, faces[:, k], face_n)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)
