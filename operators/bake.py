"""hda.bake_layer: pre-render the avatars of a frame range for render farms.

A farm renders the saved .blend with ``blender -b file.blend -a`` and may not have this add-on (or
torch): the compositor then reads the layer files baked here, and a native avatar's splat object
(Blender ≥ 5.3) loads the splat files baked here (blender_addon/native_bake.py). Synchronous on
purpose: it is also what a render script calls in ``blender -b``, where no timer or modal operator runs.
"""

import bpy
from bpy.props import IntProperty

from ..blender_addon.api import compositor, error_text, farm, layers, native, scene_avatars


class HDA_OT_bake_layer(bpy.types.Operator):
    """Bake every enabled avatar for a frame range: compositing layers into //hda_layers, native
    avatars' splats into //hda_splats (for farms)"""

    bl_idname = "hda.bake_layer"
    bl_label = "Bake Avatar Layer"
    bl_options = {'REGISTER'}  # writes files, not Blender data: no undo step

    frame_start: IntProperty(name="Start", default=-1, description="First frame (-1: the scene's start)")
    frame_end: IntProperty(name="End", default=-1, description="Last frame (-1: the scene's end)")

    @classmethod
    def poll(cls, context):
        return context.scene is not None and bool(farm.farm_avatars(context.scene))

    def execute(self, context):
        scene = context.scene
        start = scene.frame_start if self.frame_start < 0 else self.frame_start
        end = scene.frame_end if self.frame_end < 0 else self.frame_end
        if end < start:
            self.report({'ERROR'}, f"frame range {start}..{end}: expected start <= end")
            return {'CANCELLED'}
        if not bpy.data.filepath:
            self.report({'WARNING'}, "The file is not saved: baked frames go to a temporary folder a farm cannot see")
        compositor.sync(scene)
        natives = [obj for obj in farm.farm_avatars(scene) if obj.hda.native]
        current = scene.frame_current
        wm = context.window_manager
        wm.progress_begin(start, end)
        failures = []
        try:
            for frame in range(start, end + 1):
                scene.frame_set(frame)
                depsgraph = context.evaluated_depsgraph_get()
                if scene_avatars(scene):
                    failures += layers.update_scene(scene, depsgraph, frame)[0]
                for obj in natives:
                    try:
                        native.bake(obj, scene, depsgraph, frame)
                    except Exception as exc:  # noqa: BLE001 - reported; the other avatars still bake
                        failures.append(f"{obj.name}: frame {frame}: {error_text(exc)}")
                wm.progress_update(frame)
        finally:
            wm.progress_end()
            scene.frame_set(current)
            layers.flush_writer()  # the baked files are final (compressed) when the operator returns
        if failures:
            self.report({'ERROR'}, failures[0])
            return {'CANCELLED'}
        count = len(farm.farm_avatars(scene))
        where = bpy.data.filepath or "the temporary folder"
        self.report({'INFO'}, f"Baked frames {start}-{end} of {count} avatar(s) beside {where}")
        return {'FINISHED'}


CLASSES = (HDA_OT_bake_layer,)
