"""Body parts of the SMPL-X skeleton: head, torso, arms, legs, feet.

A surface point belongs to the part whose joints carry most of its LBS weight. For an avatar's Gaussians
the weights are the texel-blended skinning weights of the UV layout (``TexelBinding.weights``, paper
Eq. 7), so every texel, and the Gaussian it holds, has one part on every body in the SMPL-X layout,
whatever its UV atlas: the bundled open body carries no region labels, and needs none.

Why these five: they are where the studio's subjects differ (face and hair, top, sleeves and hands,
bottoms, shoes), so per-part colour statistics tell a new person from a blend of garments.
"""

from __future__ import annotations

import torch

from ..errors import HDAError
from .skeleton import JOINT_NAMES, NUM_JOINTS

PARTS = ("head", "torso", "arms", "legs", "feet")

_BODY_PART = {
    "pelvis": "torso", "spine1": "torso", "spine2": "torso", "spine3": "torso",
    "left_collar": "torso", "right_collar": "torso",
    "neck": "head", "head": "head", "jaw": "head", "left_eye_smplhf": "head", "right_eye_smplhf": "head",
    # SMPL-X's "shoulder" joints rotate the upper arm.
    "left_shoulder": "arms", "right_shoulder": "arms", "left_elbow": "arms", "right_elbow": "arms",
    "left_wrist": "arms", "right_wrist": "arms",
    # SMPL-X's "hip" joints rotate the thigh.
    "left_hip": "legs", "right_hip": "legs", "left_knee": "legs", "right_knee": "legs",
    "left_ankle": "feet", "right_ankle": "feet", "left_foot": "feet", "right_foot": "feet",
}


def joint_part(name: str) -> str:
    """The part of one SMPL-X joint; the 30 finger joints belong to the arms (hands)."""
    if name in _BODY_PART:
        return _BODY_PART[name]
    if name.startswith(("left_", "right_")) and name[-1] in "123":
        return "arms"
    raise HDAError(f"body part of joint {name!r}: expected an SMPL-X joint name")


JOINT_PARTS: tuple[int, ...] = tuple(PARTS.index(joint_part(n)) for n in JOINT_NAMES)  # [55] part index


def part_matrix(device: str | torch.device | None = None) -> torch.Tensor:
    """[55, P] float32 on ``device`` (None: the CPU): 1 where joint j belongs to part p."""
    m = torch.zeros(NUM_JOINTS, len(PARTS), device=device)
    m[torch.arange(NUM_JOINTS, device=device), torch.tensor(JOINT_PARTS, device=device)] = 1.0
    return m


def parts_of_weights(weights: torch.Tensor) -> torch.Tensor:
    """LBS weights [M, 55] -> part index [M] int64 (into PARTS): the part with the largest summed weight;
    a tie goes to the lower index."""
    if weights.ndim != 2 or weights.shape[1] != NUM_JOINTS:
        raise HDAError(f"body parts: weights of shape {tuple(weights.shape)}, expected [M, {NUM_JOINTS}]")
    return (weights.float() @ part_matrix(weights.device)).argmax(dim=1)  # on the weights' device (eval-gen on CUDA)
