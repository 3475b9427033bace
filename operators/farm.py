"""hda.check_farm: *Check for Farm*, before a render job is sent (blender_addon/farm.py does the work)."""

import bpy

from ..blender_addon.api import farm, session


class HDA_OT_check_farm(bpy.types.Operator):
    """Report every avatar whose baked layers are missing or stale (pose, camera, identity or settings
    changed since the bake), so that a farm without this add-on renders the scene as it is"""

    bl_idname = "hda.check_farm"
    bl_label = "Check for Farm"
    bl_options = {'REGISTER'}  # reads only: no undo step

    @classmethod
    def poll(cls, context):
        if context.scene is None or not farm.farm_avatars(context.scene):
            cls.poll_message_set("The scene has no enabled HDA avatar")
            return False
        return True

    def execute(self, context):
        scene = context.scene
        lines = farm.check_scene(scene)
        state = session.farm
        state.checked, state.lines, state.line = True, lines, farm.summary(scene, lines)
        for line in lines:
            self.report({'WARNING'}, line)
        self.report({'WARNING'} if lines else {'INFO'}, state.line)
        return {'FINISHED'}


CLASSES = (HDA_OT_check_farm,)
