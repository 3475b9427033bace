"""Motion → keyframe arrays for the avatar armature, as pure numpy (no bpy).

What operators/motion.py writes into F-curves in bulk: per bone four ``rotation_quaternion``
channels and the pelvis bone's three ``location`` channels, one key per output frame.

Frame rate: a motion has its own rate (AMASS: 60-120 fps), the scene another. ``resample_tracks``
re-times the keys to the scene's rate (slerp between the two nearest motion frames, per bone),
so one key lands on every scene frame and playback keeps the motion's real-time speed. The
alternative, setting the scene's rate to the motion's, keys every motion frame as it is.

Up axis: SMPL-X motions in the body frame stand along +Y; AMASS motions carry a +Z up world in the
root orientation, ground at z = 0. The armature's space is the body frame turned +Y → +Z
(rig.AXIS_YUP_TO_ZUP), so a +Z-up motion is first expressed in the body frame (:func:`zup_to_yup`), or
it would lie on its back, with its ground on the avatar's (rig.rest_floor), or its pelvis height would
stack on the rest body's and the feet would float.

BVH: :func:`pose_from_armature` evaluates the armature Blender's BVH importer made (its keys, through
rig.armature_pose) and :func:`pose_from_world_rotations` turns the per-joint rotations relative to
its rest pose back into SMPL-X axis-angles and translation.
"""

from __future__ import annotations

import math

import numpy as np

from . import rig
from .body.skeleton import JOINT_NAMES, NUM_JOINTS, PARENTS

FPS_MODES = ("RESAMPLE", "SCENE_FPS")


def root_up_axis(pose: np.ndarray) -> str:
    """'Y' or 'Z': which world axis the body's up (+Y) points along under the root orientations.

    pose: [F,55,3] (or [F,165]) axis-angle. The median over frames, so a lying-down frame or two
    does not flip the decision.
    """
    root = np.asarray(pose, dtype=np.float64).reshape(-1, NUM_JOINTS, 3)[:, 0]
    up = rig.axis_angle_to_matrix(root)[:, :, 1]  # R0 @ (0, 1, 0)
    med = np.median(up, axis=0)
    return "Z" if med[2] > med[1] else "Y"


def zup_to_yup(pose: np.ndarray, transl: np.ndarray, pelvis: np.ndarray,
               floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Re-express a motion whose world is +Z up, ground at z = 0 (AMASS), in the body frame's +Y-up world
    with that ground at height ``floor``.

    pose [F,55,3], transl [F,3], pelvis [3] the rest pelvis joint J0 (body frame), floor: the body
    frame's y of the avatar's ground (rig.rest_floor: where its rest soles are, which Add Avatar puts
    on the 3D cursor), so the clip's feet land on the avatar's ground instead of the clip's own pelvis
    height stacking on the rest body's. SMPL-X places the body by G = [R0 | J0 - R0 J0 + t]; turning
    the world by C = AXIS_YUP_TO_ZUPᵀ and lifting it by f = (0, floor, 0) gives C G + f =
    [C R0 | J0 - (C R0) J0 + t'] with t' = C (J0 + t) - J0 + f.
    """
    c = rig.AXIS_ZUP_TO_YUP
    pose = np.array(pose, dtype=np.float64).reshape(-1, NUM_JOINTS, 3)
    transl = np.asarray(transl, dtype=np.float64).reshape(-1, 3)
    root = c @ rig.axis_angle_to_matrix(pose[:, 0])
    pose[:, 0] = rig.quaternion_to_axis_angle(rig.matrix_to_quaternion(root))
    j0 = np.asarray(pelvis, dtype=np.float64)
    return pose, (j0 + transl) @ c.T - j0 + np.array([0.0, float(floor), 0.0])


def resample_times(num_frames: int, src_fps: float, dst_fps: float) -> np.ndarray:
    """Motion-frame positions (fractional) of the output keys: one per 1/dst_fps seconds, covering the
    motion's duration (num_frames - 1) / src_fps."""
    duration = (num_frames - 1) / src_fps
    count = int(math.floor(duration * dst_fps + 1e-6)) + 1
    return np.arange(count) * (src_fps / dst_fps)


def slerp(q0: np.ndarray, q1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation of unit quaternions q0, q1 [...,4] at t [...] (shortest arc)."""
    dot = (q0 * q1).sum(-1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)
    dot = np.abs(dot).clip(-1.0, 1.0)
    t = t[..., None]
    theta = np.arccos(dot)
    sin = np.sin(theta)
    near = sin < 1e-6  # almost equal: linear interpolation is exact enough and avoids 0/0
    w0 = np.where(near, 1 - t, np.sin((1 - t) * theta) / np.where(near, 1.0, sin))
    w1 = np.where(near, t, np.sin(t * theta) / np.where(near, 1.0, sin))
    q = w0 * q0 + w1 * q1
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def resample_tracks(quats: np.ndarray, locations: np.ndarray, src_fps: float, dst_fps: float):
    """Re-time bone tracks from ``src_fps`` to ``dst_fps``.

    quats [F,J,4] (sign-continuous), locations [F,3]. Returns (quats [G,J,4], locations [G,3]) at
    the times of :func:`resample_times`; identical rates return the input.
    """
    if abs(src_fps - dst_fps) < 1e-9:
        return quats, locations
    pos = resample_times(quats.shape[0], src_fps, dst_fps)
    lo = np.floor(pos).astype(np.int64).clip(0, quats.shape[0] - 1)
    hi = np.minimum(lo + 1, quats.shape[0] - 1)
    t = pos - lo
    q = slerp(quats[lo], quats[hi], np.broadcast_to(t[:, None], quats[lo].shape[:-1]))
    loc = locations[lo] * (1 - t)[:, None] + locations[hi] * t[:, None]
    # Keep the resampled keys on one hemisphere too: the F-curves interpolate components.
    for f in range(1, q.shape[0]):
        flip = (q[f] * q[f - 1]).sum(-1) < 0
        q[f, flip] *= -1
    return q, loc


def fcurve_coords(frames: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Flat (frame, value) pairs [2G] float32, what ``keyframe_points.foreach_set("co", ...)`` takes."""
    co = np.empty((len(frames), 2), dtype=np.float32)
    co[:, 0] = frames
    co[:, 1] = values
    return co.reshape(-1)


def pose_from_world_rotations(world: np.ndarray, root_offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SMPL-X pose and translation from joint rotations relative to the rest pose.

    world: [F,55,3,3] each joint's rotation relative to its rest orientation, in the body frame (its
    posed frame = world · rest frame); root_offset: [F,3] the pelvis' displacement from its rest
    position, body frame. SMPL-X rotates the body about the rest pelvis joint, so the pelvis moves
    only by ``transl``: transl = root_offset. Returns (pose [F,55,3] axis-angle, transl [F,3]).
    """
    world = np.asarray(world, dtype=np.float64)
    parents = np.array(PARENTS)
    parent_world = np.concatenate([np.broadcast_to(np.eye(3), world[:, :1].shape), world[:, parents[1:]]], 1)
    local = np.swapaxes(parent_world, -1, -2) @ world
    pose = rig.quaternion_to_axis_angle(rig.matrix_to_quaternion(local))
    return pose, np.asarray(root_offset, dtype=np.float64)


def pose_from_armature(parents: dict, rest: dict, quats: dict, locations: dict) -> tuple[np.ndarray, np.ndarray]:
    """SMPL-X pose and translation of an animated armature whose bones carry SMPL-X joint names (a
    BVH import), for a rest pose that is SMPL-X's T-pose.

    parents, rest, quats, locations: the armature's bones, rest matrices and channels as
    rig.armature_pose takes them (Blender's Z-up armature space). Each joint's rotation relative to
    its rest orientation becomes the body frame's; a joint the armature lacks follows its parent
    rigidly; the pelvis' displacement from rest is the translation. Returns (pose [F,55,3], transl [F,3]).
    """
    posed = rig.armature_pose(parents, rest, quats, locations)
    root = JOINT_NAMES[0]
    count = posed[root].shape[0]
    world = np.tile(np.eye(3), (count, NUM_JOINTS, 1, 1))
    for j, name in enumerate(JOINT_NAMES):
        if name in posed:  # rotation relative to rest, armature space (Z up) -> body frame (Y up)
            delta = posed[name][:, :3, :3] @ rest[name][:3, :3].T
            world[:, j] = rig.rotation_to_body(delta)
        elif j > 0:  # a joint the armature lacks follows its parent rigidly
            world[:, j] = world[:, PARENTS[j]]
    offset = rig.to_body(posed[root][:, :3, 3] - rest[root][:3, 3])
    return pose_from_world_rotations(world, offset)
