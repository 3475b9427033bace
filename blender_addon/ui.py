"""The 3D View sidebar "HDA" tab: backend status only for now (avatar panels come later)."""

import bpy

from . import state


def status_line() -> str:
    job = state.install_job
    if job is not None and job.running:
        return f"Installing: {job.status}"
    if state.check_job is not None and state.check_job.running:
        return "Checking backend..."
    return state.check_line or "Backend not checked"


class HDA_PT_backend(bpy.types.Panel):
    bl_idname = "HDA_PT_backend"
    bl_label = "Backend"
    bl_space_type = 'VIEW_3D'
    bl_region_type = 'UI'
    bl_category = "HDA"

    def draw(self, context):
        layout = self.layout
        layout.label(text=status_line(), icon='CHECKMARK' if state.check_ok else 'INFO')
        layout.operator("hda.check_backend", icon='FILE_REFRESH')


CLASSES = (HDA_PT_backend,)
