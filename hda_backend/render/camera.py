"""Pinhole cameras in OpenCV convention (x right, y down, z forward), world-to-camera 4x4 matrices."""

from __future__ import annotations

import math

import torch

from ..errors import HDAError


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """World-to-camera matrix [4,4] of a camera at ``eye`` looking at ``target`` with ``up`` up in the image.

    eye, target, up: [3].
    """
    forward = torch.nn.functional.normalize(target - eye, dim=0)
    right = torch.cross(forward, up, dim=0)
    if right.norm() < 1e-8:
        raise HDAError("camera: view direction is parallel to the up vector, expected them to differ")
    right = torch.nn.functional.normalize(right, dim=0)
    down = torch.cross(forward, right, dim=0)
    rot = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
    view = torch.eye(4, dtype=eye.dtype, device=eye.device)
    view[:3, :3] = rot
    view[:3, 3] = -rot @ eye
    return view


def intrinsics(width: int, height: int, fov_deg: float) -> torch.Tensor:
    """K [3,3] with the vertical field of view ``fov_deg`` and the principal point at the image centre."""
    focal = 0.5 * height / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])


def up_axis(joints: torch.Tensor) -> torch.Tensor:
    """The world axis (±X/±Y/±Z, [3]) nearest the pelvis-to-head direction of joints [55,3].

    Built-in motions are +Y up, AMASS files +Z up; cameras follow whichever the motion uses.
    """
    direction = joints[15] - joints[0]
    axis = int(direction.abs().argmax())
    up = joints.new_zeros(3)
    up[axis] = 1.0 if direction[axis] > 0 else -1.0
    return up


def follow_cameras(joints: torch.Tensor, kind: str, size: int, fov_deg: float = 30.0,
                   distance: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One camera per frame looking at the body: viewmats [F,4,4] and Ks [F,3,3].

    joints: [F,55,3] posed joints. ``front`` keeps the camera in front of where the body faces at the
    first frame; ``orbit`` circles it once over the clip. Both follow the pelvis horizontally and
    frame a standing adult (about 2.2 m of view at the body).
    """
    if kind not in ("front", "orbit"):
        raise HDAError(f"camera '{kind}': expected front or orbit")
    frames = joints.shape[0]
    up = up_axis(joints[0])
    # Facing direction: the body's left (left hip - right hip) crossed with up points forward.
    left = joints[0, 1] - joints[0, 2]
    forward = torch.cross(left, up, dim=0)
    forward = forward - up * (forward @ up)
    forward = torch.nn.functional.normalize(forward, dim=0) if forward.norm() > 1e-6 else torch.cross(up, torch.roll(up, 1), dim=0)
    side = torch.cross(up, forward, dim=0)
    dist = distance or 1.1 / math.tan(math.radians(fov_deg) / 2) + 0.3
    K = intrinsics(size, size, fov_deg)
    views = []
    for f in range(frames):
        pelvis = joints[f, 0]
        centre = pelvis - up * (pelvis @ up) + up * (joints[0, 0] @ up)  # follow horizontally only
        angle = 2 * math.pi * f / frames if kind == "orbit" else 0.0
        direction = math.cos(angle) * forward + math.sin(angle) * side
        eye = centre + dist * direction + 0.15 * up
        views.append(look_at(eye, centre, up))
    return torch.stack(views), K.expand(frames, 3, 3).clone()
