"""Motions: sequences of SMPL-X poses, from SMPL-X/AMASS ``.npz`` files or built-in procedural clips.

A motion is poses [F,55,3] axis-angle in SMPL-X joint order, transl [F,3] and a frame rate. Built-in
clips are in the body's own frame (+Y up, facing +Z); AMASS files carry their own (Z-up) world, which
the renderer's cameras detect from the skeleton.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .body import JOINT_INDEX, NUM_JOINTS
from .errors import HDAError

BUILTIN = ("walk", "wave", "squat", "turn", "arm_raise", "kick", "jumping_jack", "bow", "lunge")
MAX_FRAMES = 100_000


@dataclass(frozen=True)
class Motion:
    """poses [F,55,3] float32 axis-angle; transl [F,3] float32 metres; fps frames per second."""

    name: str
    poses: torch.Tensor
    transl: torch.Tensor
    fps: float

    @property
    def num_frames(self) -> int:
        return self.poses.shape[0]


def get_motion(spec: str, frames: int | None = None) -> Motion:
    """A built-in motion by name, or a ``.npz`` file path."""
    if spec in BUILTIN:
        return procedural(spec, frames or 30)
    path = Path(spec)
    if path.suffix.lower() != ".npz" and not path.exists():
        raise HDAError(f"motion '{spec}': expected a .npz file or one of {', '.join(BUILTIN)}")
    motion = load_motion_npz(path)
    if frames is not None:
        motion = Motion(motion.name, motion.poses[:frames], motion.transl[:frames], motion.fps)
    return motion


def load_motion_npz(path: str | Path) -> Motion:
    """Read an SMPL-X or AMASS motion.

    Accepted layouts: ``poses`` [F,165] (SMPL-X: root, 21 body, jaw, 2 eyes, 2 x 15 hands) or [F,156]
    (AMASS SMPL-H: root, 21 body, 2 x 15 hands) or [F,66] (body only); or ``global_orient`` [F,3] with
    ``body_pose`` [F,63] and optional ``jaw_pose``, ``leye_pose``, ``reye_pose``, ``left_hand_pose``,
    ``right_hand_pose`` (45 each). ``trans``/``transl`` [F,3] is optional. The frame rate comes from
    ``mocap_frame_rate``/``mocap_framerate``/``fps``, default 30.
    """
    path = Path(path)
    if not path.is_file():
        raise HDAError(f"motion file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if data[k].dtype.kind in "fiub"}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise HDAError(f"motion {path}: not a readable .npz file ({exc})") from None

    def get(name, width):
        a = np.asarray(arrays[name], dtype=np.float64)
        a = a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)
        if a.shape[1] != width:
            raise HDAError(f"motion {path}: field '{name}' has {a.shape[1]} values per frame, expected {width}")
        return a

    if "poses" in arrays:
        raw = np.asarray(arrays["poses"], dtype=np.float64)
        raw = raw.reshape(raw.shape[0], -1) if raw.ndim > 1 else raw.reshape(1, -1)
        frames = raw.shape[0]
        poses = np.zeros((frames, NUM_JOINTS, 3))
        if raw.shape[1] == 165:
            poses[:] = raw.reshape(frames, NUM_JOINTS, 3)
        elif raw.shape[1] == 156:  # SMPL-H: no jaw/eyes, hands follow the body directly
            poses[:, :22] = raw[:, :66].reshape(frames, 22, 3)
            poses[:, 25:] = raw[:, 66:].reshape(frames, 30, 3)
        elif raw.shape[1] == 66:
            poses[:, :22] = raw.reshape(frames, 22, 3)
        else:
            raise HDAError(f"motion {path}: field 'poses' has {raw.shape[1]} values per frame, expected 165 "
                           "(SMPL-X), 156 (SMPL-H/AMASS) or 66 (body only)")
    elif "body_pose" in arrays and "global_orient" in arrays:
        body = get("body_pose", 63)
        frames = body.shape[0]
        poses = np.zeros((frames, NUM_JOINTS, 3))
        poses[:, 0] = get("global_orient", 3)
        poses[:, 1:22] = body.reshape(frames, 21, 3)
        for name, first, count in (("jaw_pose", 22, 1), ("leye_pose", 23, 1), ("reye_pose", 24, 1),
                                   ("left_hand_pose", 25, 15), ("right_hand_pose", 40, 15)):
            if name in arrays:
                poses[:, first:first + count] = get(name, 3 * count).reshape(-1, count, 3)
    else:
        raise HDAError(f"motion {path}: no pose field, expected 'poses' or 'global_orient' + 'body_pose'")
    if not 1 <= frames <= MAX_FRAMES:
        raise HDAError(f"motion {path}: {frames} frames, expected 1..{MAX_FRAMES}")
    transl = np.zeros((frames, 3))
    for key in ("trans", "transl"):
        if key in arrays:
            t = get(key, 3)
            if t.shape[0] != frames:
                raise HDAError(f"motion {path}: field '{key}' has {t.shape[0]} frames, expected {frames} like the poses")
            transl = t
    if not (np.isfinite(poses).all() and np.isfinite(transl).all()):
        raise HDAError(f"motion {path}: poses or translations contain NaN or inf")
    fps = 30.0
    for key in ("mocap_frame_rate", "mocap_framerate", "fps"):
        if key in arrays:
            fps = float(np.asarray(arrays[key]).reshape(-1)[0])
    if not 0 < fps <= 1000:
        raise HDAError(f"motion {path}: frame rate {fps}, expected 0 < fps <= 1000")
    return Motion(path.stem, torch.tensor(poses, dtype=torch.float32), torch.tensor(transl, dtype=torch.float32), fps)


# Axis conventions of SMPL-X's rest frame: hip flexion is -X, knee flexion +X, lowering the left arm -Z
# (right +Z), left elbow flexion -Y (right +Y). Every clip starts from the arms hanging by ARMS_DOWN.
ARMS_DOWN = 1.2
J = JOINT_INDEX


def _walk(poses: torch.Tensor, transl: torch.Tensor, phase: torch.Tensor) -> None:
    s = torch.sin(phase)
    swing = 0.45 * s
    poses[:, J["left_hip"], 0] = -swing
    poses[:, J["right_hip"], 0] = swing
    poses[:, J["left_knee"], 0] = 0.6 * torch.clamp(torch.sin(phase + math.pi / 2), min=0) + 0.1
    poses[:, J["right_knee"], 0] = 0.6 * torch.clamp(torch.sin(phase - math.pi / 2), min=0) + 0.1
    poses[:, J["left_shoulder"], 0] = 0.4 * s
    poses[:, J["right_shoulder"], 0] = -0.4 * s
    poses[:, J["left_elbow"], 1] = -0.3
    poses[:, J["right_elbow"], 1] = 0.3
    poses[:, J["spine2"], 1] = 0.1 * s
    transl[:, 2] = torch.linspace(0, 0.9, len(phase), dtype=torch.float64)
    transl[:, 1] = 0.015 * torch.cos(2 * phase)


def _wave(poses: torch.Tensor, transl: torch.Tensor, phase: torch.Tensor) -> None:
    s = torch.sin(phase)
    poses[:, J["right_shoulder"], 2] = -1.3 + 0.1 * s
    poses[:, J["right_elbow"], 1] = 0.4
    poses[:, J["right_elbow"], 2] = -0.8 + 0.5 * s
    poses[:, J["right_wrist"], 2] = 0.3 * s
    poses[:, J["head"], 1] = -0.2
    poses[:, J["spine3"], 2] = 0.05 * s


def _squat(poses: torch.Tensor, transl: torch.Tensor, phase: torch.Tensor) -> None:
    depth = 0.5 - 0.5 * torch.cos(phase)
    poses[:, J["left_hip"], 0] = -1.3 * depth
    poses[:, J["right_hip"], 0] = -1.3 * depth
    poses[:, J["left_knee"], 0] = 2.0 * depth
    poses[:, J["right_knee"], 0] = 2.0 * depth
    poses[:, J["left_ankle"], 0] = -0.6 * depth
    poses[:, J["right_ankle"], 0] = -0.6 * depth
    poses[:, J["spine1"], 0] = 0.3 * depth
    poses[:, J["left_shoulder"], 0] = -1.2 * depth
    poses[:, J["right_shoulder"], 0] = -1.2 * depth
    poses[:, J["left_shoulder"], 2] = -ARMS_DOWN * (1 - depth)
    poses[:, J["right_shoulder"], 2] = ARMS_DOWN * (1 - depth)
    transl[:, 1] = -0.38 * depth


def _turn(poses: torch.Tensor, transl: torch.Tensor, phase: torch.Tensor) -> None:
    s = torch.sin(phase)
    poses[:, 0, 1] = phase
    poses[:, J["spine2"], 1] = 0.2 * s
    poses[:, J["head"], 1] = 0.3 * s
    poses[:, J["left_elbow"], 1] = -0.5
    poses[:, J["right_elbow"], 1] = 0.5


def _arm_raise(poses: torch.Tensor, transl: torch.Tensor, phase: torch.Tensor) -> None:
    """Lateral raises, the arms half a cycle apart: hanging (-Z left / +Z right) to overhead."""
    left = 0.5 - 0.5 * torch.cos(phase)
    right = 0.5 - 0.5 * torch.cos(phase + math.pi)
    poses[:, J["left_shoulder"], 2] = -ARMS_DOWN + 2.5 * left
    poses[:, J["right_shoulder"], 2] = ARMS_DOWN - 2.5 * right
    poses[:, J["left_elbow"], 1] = -0.25 - 0.5 * left
    poses[:, J["right_elbow"], 1] = 0.25 + 0.5 * right
    poses[:, J["spine3"], 2] = 0.08 * (left - right)


def _kick(poses: torch.Tensor, transl: torch.Tensor, phase: torch.Tensor) -> None:
    """Right front kick: chamber (hip and knee flex), extend at the top, return; arms guard."""
    lift = 0.5 - 0.5 * torch.cos(phase)
    poses[:, J["right_hip"], 0] = -1.4 * lift
    poses[:, J["right_knee"], 0] = 1.3 * torch.sin(phase) ** 2 * (1 - lift) + 0.08
    poses[:, J["right_ankle"], 0] = 0.3 * lift
    poses[:, J["left_knee"], 0] = 0.15 * lift
    poses[:, J["left_hip"], 0] = -0.1 * lift
    poses[:, J["spine1"], 0] = -0.15 * lift
    poses[:, J["left_elbow"], 1] = -1.6
    poses[:, J["right_elbow"], 1] = 1.6
    poses[:, J["left_shoulder"], 0] = -0.5
    poses[:, J["right_shoulder"], 0] = -0.5
    transl[:, 1] = -0.02 * lift


def _jumping_jack(poses: torch.Tensor, transl: torch.Tensor, phase: torch.Tensor) -> None:
    """Arms from hanging to overhead while the legs spread (left hip +Z, right hip -Z), with a hop."""
    open_ = 0.5 - 0.5 * torch.cos(phase)
    poses[:, J["left_shoulder"], 2] = -ARMS_DOWN + 2.6 * open_
    poses[:, J["right_shoulder"], 2] = ARMS_DOWN - 2.6 * open_
    poses[:, J["left_hip"], 2] = 0.35 * open_
    poses[:, J["right_hip"], 2] = -0.35 * open_
    poses[:, J["left_ankle"], 2] = -0.3 * open_
    poses[:, J["right_ankle"], 2] = 0.3 * open_
    poses[:, J["left_knee"], 0] = 0.25 * torch.sin(2 * phase) ** 2
    poses[:, J["right_knee"], 0] = 0.25 * torch.sin(2 * phase) ** 2
    transl[:, 1] = 0.06 * torch.sin(2 * phase).abs()


def _bow(poses: torch.Tensor, transl: torch.Tensor, phase: torch.Tensor) -> None:
    """Tip the pelvis forward (+X on the root) with the hips flexing back (-X) so the legs stay upright,
    bend the spine forward (+X), arms hanging, then straighten."""
    depth = 0.5 - 0.5 * torch.cos(phase)
    poses[:, 0, 0] = 0.6 * depth
    for spine in ("spine1", "spine2", "spine3"):
        poses[:, J[spine], 0] = 0.25 * depth
    poses[:, J["left_hip"], 0] = -0.6 * depth
    poses[:, J["right_hip"], 0] = -0.6 * depth
    poses[:, J["head"], 0] = 0.2 * depth
    poses[:, J["left_elbow"], 1] = -0.2 * depth
    poses[:, J["right_elbow"], 1] = 0.2 * depth


def _lunge(poses: torch.Tensor, transl: torch.Tensor, phase: torch.Tensor) -> None:
    """Alternating forward lunges: front hip flexes (-X) and knee bends, the back knee drops."""
    for side, sign, offset in (("left", 1.0, 0.0), ("right", -1.0, math.pi)):
        step = torch.clamp(torch.sin(phase + offset), min=0)
        other = "right" if side == "left" else "left"
        poses[:, J[f"{side}_hip"], 0] += -1.1 * step
        poses[:, J[f"{side}_knee"], 0] += 1.3 * step
        poses[:, J[f"{other}_hip"], 0] += 0.35 * step
        poses[:, J[f"{other}_knee"], 0] += 1.1 * step
        poses[:, J["spine2"], 1] += 0.15 * sign * step
    poses[:, J["left_elbow"], 1] = -0.4
    poses[:, J["right_elbow"], 1] = 0.4
    transl[:, 1] = -0.21 * torch.sin(phase).abs()


# The built-in clips: each writes its keyframes into poses [F,55,3] and transl [F,3] (float64, the arms
# already hanging) for phases [F] over one cycle [0, 2π).
CLIPS = {"walk": _walk, "wave": _wave, "squat": _squat, "turn": _turn, "arm_raise": _arm_raise, "kick": _kick,
         "jumping_jack": _jumping_jack, "bow": _bow, "lunge": _lunge}
assert tuple(CLIPS) == BUILTIN


def procedural(name: str, frames: int = 30, fps: float = 30.0) -> Motion:
    """Built-in looping clips keyframed on the SMPL-X skeleton (:data:`CLIPS`); ``frames`` covers one cycle."""
    if name not in BUILTIN:
        raise HDAError(f"motion '{name}': expected one of {', '.join(BUILTIN)}")
    if not 1 <= frames <= MAX_FRAMES:
        raise HDAError(f"motion '{name}': {frames} frames, expected 1..{MAX_FRAMES}")
    phase = torch.arange(frames, dtype=torch.float64) / max(frames, 1) * 2 * math.pi
    poses = torch.zeros(frames, NUM_JOINTS, 3, dtype=torch.float64)
    transl = torch.zeros(frames, 3, dtype=torch.float64)
    poses[:, J["left_shoulder"], 2] = -ARMS_DOWN
    poses[:, J["right_shoulder"], 2] = ARMS_DOWN
    CLIPS[name](poses, transl, phase)
    return Motion(name, poses.float(), transl.float(), fps)


def pose_at(name: str, phase: float, cycle: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pose [55,3], transl [3]) of the built-in clip ``name`` at ``phase`` in [0, 1) of its cycle: frame
    round(phase · cycle) mod cycle of the clip sampled at ``cycle`` frames per cycle."""
    clip = procedural(name, cycle)
    f = round(phase * cycle) % cycle
    return clip.poses[f], clip.transl[f]
