"""The pose the playhead will show: the viewport's look-ahead during playback.

While the animation plays, the viewport's worker runs the UNet on the pose a few frames on
(hda_backend.preview.REFRESH_FRAMES) once the frame on screen is rasterized, so the frames in between
interpolate between two UNet outputs (hda_backend.preview.PoseStage). That pose is predicted from
the avatar's action alone: its bones' ``rotation_quaternion`` and ``location`` F-curves evaluated at
the frame, taken through Blender's armature formula (rig.armature_pose) and read as an SMPL-X pose as
the evaluated armature is (rig.pose_from_bone_matrices). Anything else that moves the bones
(constraints, drivers, NLA strips, Euler rotation modes) is not predicted. So a prediction is only
made when the same prediction for the frame on screen equals the pose Blender evaluated for it
(preview.same_pose), and the worker uses the output it made ahead only for the frame whose evaluated
pose matches it: a wrong prediction costs the speed-up, never a wrong image.

Where the action's keys alone do not give the pose, a loop played once gives it: the poses Blender
evaluated while playing are kept per frame (:func:`played_ahead`), and once the pose kept for the frame
on screen equals the one evaluated now, the one kept for the frame ahead is named. An edit since then
that changes only frames ahead makes that prediction wrong; it is then never used for the frame it
names (the worker checks), only interpolated towards for the frame between, as the level of detail's
preview while moving.

Main thread only (bpy); the arithmetic is hda_backend.rig's.
"""

from __future__ import annotations

import numpy as np

# At most this many frames' poses are kept per avatar for played_ahead (660 bytes each).
PLAYED_MAX = 20_000


def object_fcurves(obj) -> list:
    """The F-curves animating ``obj`` through its action (Blender 4.2's actions and 4.4+'s layered ones)."""
    ad = obj.animation_data
    if ad is None or ad.action is None:
        return []
    action = ad.action
    if getattr(action, "is_action_layered", False):
        from bpy_extras.anim_utils import action_get_channelbag_for_slot

        bag = action_get_channelbag_for_slot(action, ad.action_slot)
        return list(bag.fcurves) if bag is not None else []
    return list(action.fcurves)


def _range(scene) -> tuple[int, int]:
    """The frames playback loops over: the preview range where one is set, else the scene's."""
    if scene.use_preview_range:
        return scene.frame_preview_start, scene.frame_preview_end
    return scene.frame_start, scene.frame_end


def frame_ahead(scene, frame: int, step: int) -> int:
    """The frame ``step`` frames from ``frame`` (negative: backwards) as playback reaches it, looping
    within the playback range."""
    start, end = _range(scene)
    if end < start or not start <= frame <= end:
        return frame + step
    return start + (frame - start + step) % (end - start + 1)


def direction(scene, last: int, frame: int) -> int:
    """+1 where playback went from ``last`` to ``frame`` forwards (the shorter way round the looping
    range; also for no change), -1 backwards."""
    start, end = _range(scene)
    if not (end >= start and start <= last <= end and start <= frame <= end):
        return -1 if frame < last else 1
    span = end - start + 1
    return -1 if (last - frame) % span < (frame - last) % span else 1


def predict_poses(obj, frames, layout) -> np.ndarray | None:
    """SMPL-X poses [F,165] of the armature ``obj`` at ``frames`` from its action's quaternion and
    location keys alone (a channel without keys keeps the pose bone's own value); None where one of
    the 55 bones has a parent outside them."""
    from ..hda_backend import rig

    bones, data = obj.pose.bones, obj.data.bones
    parents = {n: (data[n].parent.name if data[n].parent is not None else None) for n in layout.names}
    if any(p is not None and p not in parents for p in parents.values()):
        return None  # a bone outside the 55 moves them: not predicted
    frames = [float(f) for f in frames]
    index = {b.name: i for i, b in enumerate(bones)}
    # Every bone's own values in one call each (foreach_get), then the keyed channels over them.
    quat = np.empty((len(bones), 4), np.float32)
    loc = np.empty((len(bones), 3), np.float32)
    bones.foreach_get("rotation_quaternion", quat.ravel())
    bones.foreach_get("location", loc.ravel())
    quats = np.repeat(quat[None].astype(np.float64), len(frames), 0)
    locations = np.repeat(loc[None].astype(np.float64), len(frames), 0)
    for fc in object_fcurves(obj):
        path = fc.data_path
        if not path.startswith('pose.bones["'):
            continue
        name, channel = path[12:].split('"]', 1)
        table = quats if channel == ".rotation_quaternion" else locations if channel == ".location" else None
        if table is not None and name in index and 0 <= fc.array_index < table.shape[2]:
            table[:, index[name], fc.array_index] = [fc.evaluate(f) for f in frames]
    rest = np.empty(len(data) * 16, np.float32)
    data.foreach_get("matrix_local", rest)
    rest = rest.reshape(-1, 4, 4).transpose(0, 2, 1).astype(np.float64)  # foreach_get: column by column
    data_index = {b.name: i for i, b in enumerate(data)}
    posed = rig.armature_pose(parents, {n: rest[data_index[n]] for n in layout.names},
                              {n: quats[:, index[n]] for n in layout.names},
                              {n: locations[:, index[n]] for n in layout.names})
    matrices = np.stack([posed[n] for n in layout.names], axis=1)   # [F,55,4,4]
    return rig.pose_from_bone_matrices(matrices, layout)[0].reshape(len(frames), -1)


def action_id(obj) -> int | None:
    """The pointer of ``obj``'s action, or None: what a verdict of :func:`ahead_pose` is kept under."""
    data = obj.animation_data
    return None if data is None or data.action is None else data.action.as_pointer()


def ahead_pose(obj, scene, pose: np.ndarray, layout, step: int):
    """(the pose [165] the playhead shows ``step`` frames on or None, whether the action predicts the
    pose on screen). None where there is no action, the frame is the one on screen, or the action does
    not give the pose on screen (``pose``, evaluated by Blender: constraints, drivers, NLA); only the last
    case says False, and it lasts while the rig does (viewport.look_ahead stops asking)."""
    from ..hda_backend.preview import same_pose

    frame = scene.frame_current
    target = frame_ahead(scene, frame, step)
    if target == frame or action_id(obj) is None:
        return None, True
    predicted = predict_poses(obj, (frame, target), layout)
    if predicted is None or not same_pose(predicted[0], pose):
        return None, False
    return predicted[1].astype(np.float32), True


def played_ahead(played: dict, scene, pose: np.ndarray, step: int):
    """Keep ``pose`` (evaluated by Blender at the frame on screen) in ``played`` ({frame: pose}, the
    poses seen while playing) and return the pose kept for ``step`` frames on, where the one kept for
    this frame (a loop before) equals ``pose``; None otherwise."""
    from ..hda_backend.preview import same_pose

    frame = scene.frame_current
    seen = played.get(frame)
    if len(played) >= PLAYED_MAX and seen is None:
        played.clear()  # a bound on what is kept (a long shot played once): start again
    played[frame] = np.array(pose, dtype=np.float32)
    if seen is None or not same_pose(seen, pose):
        return None
    return played.get(frame_ahead(scene, frame, step))
