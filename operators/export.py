"""hda.export_ply: the active avatar's Gaussians as standard 3DGS ``.ply`` files (hda_backend/export_ply.py),
the current frame or a frame range, one file per frame.

The pose is read exactly as the renders read it (runtime.read_pose on the evaluated armature:
keys, drivers, constraints, IK), the Gaussians come from the same avatar the viewport and the
renders use (runtime.get_avatar). Coordinates: *World* (default) places them where the avatar stands
in the scene, Blender's +Z up, the armature object's transform included, so the files line up with
other exports of the scene; *Body* writes the backend's body frame (+Y up, SMPL-X's).
"""

import os

import bpy
import numpy as np
from bpy.props import EnumProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ExportHelper

from ..blender_addon.api import avatar_of, error_text, poll_active_avatar, runtime
from ..hda_backend.errors import HDAError


def world_matrix(obj, depsgraph) -> np.ndarray:
    """[4,4] body frame -> Blender world for the avatar armature ``obj``: its world matrix after the
    rig's +Y-up to +Z-up turn."""
    from ..hda_backend import rig

    return rig.body_to_world(np.array(obj.evaluated_get(depsgraph).matrix_world, dtype=np.float64))


def frame_gaussians(obj, depsgraph, coords: str = "WORLD"):
    """The avatar's Gaussians for the pose ``depsgraph`` evaluates (one frame, no batch dim)."""
    import torch

    from ..hda_backend.export_ply import transform_gaussians

    avatar = runtime.get_avatar(obj)
    if coords == "WORLD":
        from ..hda_backend import rig

        scale = tuple(obj.evaluated_get(depsgraph).matrix_world.to_scale())
        if not rig.is_uniform_scale(scale):
            raise HDAError(f"armature '{obj.name}': scale {tuple(round(float(v), 4) for v in scale)}, expected a "
                           "uniform scale for World coordinates (Gaussians cannot shear); export Body coordinates")
    pose, transl = runtime.read_pose(obj, depsgraph, runtime.get_layout(avatar.body))
    with torch.inference_mode():
        g = runtime.pose_gaussians(avatar, pose, transl)
        g = type(g)(*(t.cpu() for t in g))
        if coords == "WORLD":
            g = transform_gaussians(g, torch.as_tensor(world_matrix(obj, depsgraph)))
    return g


def export_frames(context, obj, filepath: str, frames: list[int], coords: str = "WORLD") -> list[str]:
    """Write one ``.ply`` per scene frame (export_ply.output_paths naming); the current frame is restored."""
    from ..hda_backend.export_ply import output_paths, write_ply

    scene = context.scene
    paths = output_paths(filepath, frames)
    current = scene.frame_current, scene.frame_subframe
    wm = context.window_manager
    wm.progress_begin(0, len(frames))
    written = []
    try:
        for i, (frame, path) in enumerate(zip(frames, paths)):
            if frame != scene.frame_current:
                scene.frame_set(frame)
            written.append(str(write_ply(path, frame_gaussians(obj, context.evaluated_depsgraph_get(), coords))))
            wm.progress_update(i + 1)
    finally:
        wm.progress_end()
        if (scene.frame_current, scene.frame_subframe) != current:
            scene.frame_set(current[0], subframe=current[1])
    return written


class HDA_OT_export_ply(ExportHelper, bpy.types.Operator):
    """Export the active avatar's Gaussians as standard 3D Gaussian Splatting .ply files, one per frame"""

    bl_idname = "hda.export_ply"
    bl_label = "Export Gaussians (.ply)"
    bl_options = {'REGISTER'}  # writes files, changes no Blender data

    filename_ext = ".ply"
    filter_glob: StringProperty(default="*.ply", options={'HIDDEN'})
    frames: EnumProperty(
        name="Frames", default="CURRENT",
        items=(("CURRENT", "Current Frame", "One file for the current frame"),
               ("RANGE", "Frame Range", "One file per frame, <name>_<frame>.ply")))
    frame_start: IntProperty(name="Start", default=1)
    frame_end: IntProperty(name="End", default=250)
    coords: EnumProperty(
        name="Coordinates", default="WORLD",
        items=(("WORLD", "World", "Where the avatar stands in the scene (+Z up, the armature's transform)"),
               ("BODY", "Body", "The backend's body frame (+Y up, SMPL-X's); the armature's transform ignored")))

    @classmethod
    def poll(cls, context):
        return poll_active_avatar(cls, context)

    def invoke(self, context, event):
        self.frame_start, self.frame_end = context.scene.frame_start, context.scene.frame_end
        obj = avatar_of(context.active_object)
        self.filepath = f"{obj.name}.ply" if not self.filepath else self.filepath
        return super().invoke(context, event)

    def execute(self, context):
        obj = avatar_of(context.active_object)
        if self.frames == "CURRENT":
            frames = [context.scene.frame_current]
        elif self.frame_end < self.frame_start:
            self.report({'ERROR'}, f"Frame range {self.frame_start}..{self.frame_end}: expected start <= end")
            return {'CANCELLED'}
        else:
            frames = list(range(self.frame_start, self.frame_end + 1))
        path = os.path.abspath(bpy.path.abspath(self.filepath))
        try:
            written = export_frames(context, obj, path, frames, self.coords)
        except Exception as exc:  # noqa: BLE001 - bad avatar files, paths, transforms become a report
            self.report({'ERROR'}, error_text(exc, unexpected="raise"))
            return {'CANCELLED'}
        self.report({'INFO'}, f"Wrote {len(written)} .ply file{'s' if len(written) > 1 else ''}: {written[0]}"
                              + (f" ... {os.path.basename(written[-1])}" if len(written) > 1 else ""))
        return {'FINISHED'}


CLASSES = (HDA_OT_export_ply,)
