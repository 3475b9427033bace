"""hda.import_motion: an SMPL-X / AMASS ``.npz`` or a BVH with SMPL-X joint names → keyframes on the
active avatar's armature.

Keys are written in bulk: one new Action, per bone four ``rotation_quaternion`` F-curves and the
pelvis' three ``location`` F-curves, each filled by ``keyframe_points.add(n)`` and
``keyframe_points.foreach_set("co"/"interpolation", ...)``, never by per-key ``keyframe_insert``.
Bone values come from rig.bone_rotations_from_pose (the rig's own convention), re-timed and turned
upright by hda_backend.motion_keys; a +Z-up (AMASS) clip's ground lands on the avatar's ground, the
cursor height Add Avatar stood the rest body on (motion_keys.zup_to_yup with rig.rest_floor).

Frame rate (``fps_mode``): *Resample* (default) keeps the scene's rate and slerps the motion onto
it, one key per scene frame, so the motion plays at its real speed in any scene; *Scene FPS* sets
the scene's rate to the motion's (fps / fps_base for non-integer rates) and keys every motion frame.

BVH: imported with Blender's own importer (bpy.ops.import_anim.bvh) into a temporary armature; the
rotations of its bones relative to its rest pose, matched to ours by SMPL-X joint name, become the
SMPL-X pose, and its root's displacement the translation; the temporary armature is deleted. This
works for BVH files whose rest pose (all channels zero) is SMPL-X's T-pose, as BVH exports of
SMPL-X motions are; joints missing from the file keep their rest rotation.
"""

import os

import bpy
import numpy as np
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

from ..blender_addon.api import avatar_of, error_text, playback, poll_active_avatar, runtime
from ..hda_backend.errors import HDAError

INTERPOLATIONS = (("LINEAR", "Linear", "Straight lines between keys (dense motion capture)"),
                  ("BEZIER", "Bezier", "Smooth curves (may overshoot between sparse keys)"),
                  ("CONSTANT", "Constant", "Hold each key until the next"))


def scene_fps(scene) -> float:
    return scene.render.fps / scene.render.fps_base


def set_scene_fps(scene, fps: float) -> None:
    """Blender stores a rate as an integer fps over a float fps_base (29.97 = 30 / 1.001)."""
    whole = max(1, int(round(fps)))
    scene.render.fps = whole
    scene.render.fps_base = whole / fps


# ---------------------------------------------------------------------------------------- F-curves
def new_fcurve(action, obj, data_path: str, index: int, group: str):
    """An F-curve of ``action`` (assigned to ``obj``) on Blender 4.2 (legacy actions) and 4.4+
    (layered actions: the curve goes into the channelbag of the object's slot)."""
    if hasattr(action, "fcurve_ensure_for_datablock"):
        return action.fcurve_ensure_for_datablock(obj, data_path, index=index, group_name=group)
    return action.fcurves.new(data_path, index=index, action_group=group)


def write_keys(obj, action_name: str, names, frames: np.ndarray, quats: np.ndarray, locations: np.ndarray,
               interpolation: str = "LINEAR"):
    """Key the armature ``obj`` in one new Action, in bulk.

    names: bone names (J); frames: [G] scene frames; quats: [G,J,4] wxyz rotation_quaternion values;
    locations: [G,3] the first bone's (the pelvis') location. Returns the Action.
    """
    ad = obj.animation_data_create()
    action = bpy.data.actions.new(action_name)
    ad.action = action
    interp = bpy.types.Keyframe.bl_rna.properties["interpolation"].enum_items[interpolation].value
    modes = np.full(len(frames), interp, dtype=np.int32)
    channels = [(f'pose.bones["{name}"].rotation_quaternion', i, name, quats[:, j, i])
                for j, name in enumerate(names) for i in range(4)]
    channels += [(f'pose.bones["{names[0]}"].location', i, names[0], locations[:, i]) for i in range(3)]
    from ..hda_backend.motion_keys import fcurve_coords

    for data_path, index, group, values in channels:
        fc = new_fcurve(action, obj, data_path, index, group)
        fc.keyframe_points.add(len(frames))
        fc.keyframe_points.foreach_set("co", fcurve_coords(frames, values))
        fc.keyframe_points.foreach_set("interpolation", modes)
        fc.update()
    for pb in obj.pose.bones:
        pb.rotation_mode = 'QUATERNION'
    return action


# --------------------------------------------------------------------------------------------- BVH
def bvh_frame_rate(path: str) -> tuple[int, float]:
    """(frames, fps) from a BVH file's MOTION header."""
    frames = frame_time = None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                words = line.split()
                if line.startswith("Frames:") and len(words) >= 2:
                    frames = int(words[1])
                elif line.startswith("Frame Time:") and len(words) >= 3:
                    frame_time = float(words[2])
                    break
    except (OSError, ValueError) as exc:
        raise HDAError(f"BVH {path}: not readable ({exc})") from None
    if frames is None or frame_time is None:
        raise HDAError(f"BVH {path}: no 'Frames:' / 'Frame Time:' lines, expected a BVH MOTION section")
    if not 1 <= frames <= 100_000 or not 0 < frame_time <= 10:
        raise HDAError(f"BVH {path}: {frames} frames of {frame_time} s, expected 1..100000 frames of 0..10 s")
    return frames, 1.0 / frame_time


def read_bvh(path: str) -> tuple[np.ndarray, np.ndarray, float]:
    """SMPL-X (pose [F,55,3], transl [F,3], fps) of a BVH with SMPL-X joint names, through Blender's
    BVH importer; the temporary armature it creates is removed again."""
    from ..hda_backend.body.skeleton import JOINT_NAMES
    from ..hda_backend.motion_keys import pose_from_armature

    count, fps = bvh_frame_rate(path)
    before = set(bpy.data.objects)
    try:
        result = bpy.ops.import_anim.bvh(filepath=path, rotate_mode='QUATERNION', use_fps_scale=False,
                                         update_scene_fps=False, update_scene_duration=False, frame_start=1)
    except RuntimeError as exc:
        raise HDAError(f"BVH {path}: Blender's importer failed ({str(exc).strip().splitlines()[-1]})") from None
    created = [o for o in bpy.data.objects if o not in before]
    try:
        arm = next((o for o in created if o.type == 'ARMATURE'), None)
        if 'FINISHED' not in result or arm is None:
            raise HDAError(f"BVH {path}: Blender's importer made no armature")
        bones = arm.data.bones
        found = [n for n in JOINT_NAMES if n in bones]
        if JOINT_NAMES[0] not in bones or len(found) < 22:
            raise HDAError(f"BVH {path}: joints {sorted(bones.keys())[:6]}..., expected SMPL-X joint names "
                           f"(pelvis, left_hip, ...; {len(found)} of 55 found)")
        frames = np.arange(1, count + 1, dtype=np.float64)
        # Pose-bone channels at every frame, interpolated from the importer's keys.
        quat = {n: np.tile([1.0, 0, 0, 0], (count, 1)) for n in bones.keys()}
        loc = {n: np.zeros((count, 3)) for n in bones.keys()}
        for fc in playback.object_fcurves(arm):
            name = fc.data_path.split('"')[1] if '"' in fc.data_path else None
            if name not in quat:
                continue
            co = np.empty(2 * len(fc.keyframe_points), dtype=np.float64)
            fc.keyframe_points.foreach_get("co", co)
            values = np.interp(frames, co[0::2], co[1::2])
            if fc.data_path.endswith("rotation_quaternion"):
                quat[name][:, fc.array_index] = values
            elif fc.data_path.endswith("location"):
                loc[name][:, fc.array_index] = values
        rest = {n: np.array(b.matrix_local, dtype=np.float64) for n, b in bones.items()}
        parents = {n: (b.parent.name if b.parent is not None else None) for n, b in bones.items()}
        pose, transl = pose_from_armature(parents, rest, quat, loc)  # Blender's FK, then SMPL-X's pose
        return pose, transl, fps
    finally:
        for obj in created:
            data = obj.data
            action = obj.animation_data.action if obj.animation_data else None
            bpy.data.objects.remove(obj)
            if isinstance(data, bpy.types.Armature) and data.users == 0:
                bpy.data.armatures.remove(data)
            if action is not None and action.users == 0:
                bpy.data.actions.remove(action)


# -------------------------------------------------------------------------------------- the operator
def import_motion(context, obj, path: str, *, fps_mode="RESAMPLE", up_axis="AUTO", frame_start=1,
                  set_frame_range=True, interpolation="LINEAR") -> dict:
    """Key the motion file ``path`` onto the avatar armature ``obj``; returns a summary dict.

    Raises HDAError for a bad file (missing, corrupt, wrong layout, NaN, unknown joints)."""
    from ..hda_backend import motion_keys, rig

    scene = context.scene
    body = runtime.get_body(runtime.body_file(obj))
    layout = runtime.get_layout(body)
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise HDAError(f"motion file not found: {path}")
    if ext == ".bvh":
        try:
            pose, transl, fps = read_bvh(path)
        finally:  # Blender's importer made its (now removed) armature active: the avatar is again
            for other in context.view_layer.objects:  # (the removed armature may linger in .selected)
                if other.select_get():
                    other.select_set(False)
            context.view_layer.objects.active = obj
            obj.select_set(True)
    elif ext == ".npz":
        from ..hda_backend.motion import load_motion_npz

        motion = load_motion_npz(path)
        pose, transl, fps = motion.poses.double().numpy(), motion.transl.double().numpy(), motion.fps
    else:
        raise HDAError(f"motion {path}: unknown file type '{ext}', expected .npz (SMPL-X/AMASS) or .bvh")
    up = motion_keys.root_up_axis(pose) if up_axis == "AUTO" else up_axis
    if up == "Z":
        # The clip's ground (z = 0) onto the avatar's, where Add Avatar stood its rest soles.
        floor = rig.rest_floor(body.v_template.double().numpy())
        pose, transl = motion_keys.zup_to_yup(pose, transl, layout.rest_joints[0], floor)
    quats, locations = rig.bone_rotations_from_pose(pose, transl, layout)
    if fps_mode == "SCENE_FPS":
        set_scene_fps(scene, fps)
    else:
        quats, locations = motion_keys.resample_tracks(quats, locations, fps, scene_fps(scene))
    frames = frame_start + np.arange(quats.shape[0], dtype=np.float64)
    name = os.path.splitext(os.path.basename(path))[0]
    action = write_keys(obj, f"{obj.name}_{name}", layout.names, frames, quats, locations, interpolation)
    if set_frame_range:
        scene.frame_start, scene.frame_end = int(frames[0]), int(frames[-1])
    return {"action": action.name, "keys": len(frames), "source_frames": int(pose.shape[0]), "fps": fps,
            "scene_fps": scene_fps(scene), "up": up}


class HDA_OT_import_motion(ImportHelper, bpy.types.Operator):
    """Import an SMPL-X/AMASS .npz or a BVH with SMPL-X joint names as keyframes on the active avatar"""

    bl_idname = "hda.import_motion"
    bl_label = "Import Motion"
    bl_options = {'REGISTER', 'UNDO'}

    filename_ext = ".npz"
    filter_glob: StringProperty(default="*.npz;*.bvh", options={'HIDDEN'})
    fps_mode: EnumProperty(
        name="Frame Rate", default="RESAMPLE",
        items=(("RESAMPLE", "Resample to Scene", "Keep the scene's frame rate; re-time the motion onto it "
                                                 "(one key per scene frame, real-time speed)"),
               ("SCENE_FPS", "Set Scene FPS", "Set the scene's frame rate to the motion's; one key per "
                                              "motion frame")))
    up_axis: EnumProperty(
        name="Motion Up Axis", default="AUTO",
        items=(("AUTO", "Auto", "Detect from the root orientation (AMASS: Z, SMPL-X fits: Y)"),
               ("Y", "Y Up", "The body frame's +Y up (SMPL-X fits, this project's clips)"),
               ("Z", "Z Up", "+Z up world (AMASS)")))
    frame_start: IntProperty(name="Start Frame", default=1, description="Scene frame of the motion's first frame")
    set_frame_range: BoolProperty(name="Set Frame Range", default=True,
                                  description="Set the scene's start/end frames to the motion's")
    interpolation: EnumProperty(name="Interpolation", items=INTERPOLATIONS, default="LINEAR")

    @classmethod
    def poll(cls, context):
        return poll_active_avatar(cls, context)

    def invoke(self, context, event):
        self.frame_start = context.scene.frame_current
        return super().invoke(context, event)

    def execute(self, context):
        obj = avatar_of(context.active_object)
        path = os.path.abspath(bpy.path.abspath(self.filepath))
        try:
            info = import_motion(context, obj, path, fps_mode=self.fps_mode, up_axis=self.up_axis,
                                 frame_start=self.frame_start, set_frame_range=self.set_frame_range,
                                 interpolation=self.interpolation)
        except Exception as exc:  # noqa: BLE001 - bad files and a missing backend become a report
            self.report({'ERROR'}, error_text(exc, unexpected="raise"))
            return {'CANCELLED'}
        self.report({'INFO'}, f"{os.path.basename(path)}: {info['source_frames']} frames at {info['fps']:g} fps "
                              f"-> {info['keys']} keys at {info['scene_fps']:g} fps on {obj.name} ({info['up']} up)")
        return {'FINISHED'}


CLASSES = (HDA_OT_import_motion,)
