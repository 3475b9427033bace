"""The 3D View sidebar "HDA" tab: one panel for everything an animator does with avatars.

Avatars in the scene (click one to make it active) and the active avatar's state; identity (seed,
Random, Sample, the slider towards a second seed; once sampled they resample live, identity.py); load
an avatar file; fit to a capture subject (progress bar with PSNR, Cancel); import motion; export .ply;
bake the compositing layer and check it for the farm (the last check's summary); backend status
(device, torch version, per-frame milliseconds, the last error) and a link to the preferences. The
same operators are in Blender's menus too (menus.py).

``draw()`` only reads: properties and the session (session.py: job states, errors, timings already
measured). It never
imports torch (the version shown is that of a torch already imported, or the last backend check)
and never loads, renders or polls anything.
"""

import sys

import bpy
from bpy.props import StringProperty

from ..hda_backend.constants import NATIVE_BLENDER_MIN
from . import session
from .diffusion_model import model_path
from .identity import busy
from .objects import all_avatars, avatar_of, object_key
from .paths import addon_id

# The viewport's look-ahead while playing (viewport.look_ahead), as the Backend box says it.
AHEAD_ON = "playback looks ahead in the action"
AHEAD_OFF = "no look-ahead yet: constraints, drivers or NLA move the pose (it starts once a loop has played)"
from .preferences import frame_cache_line, get_prefs


def status_line() -> str:
    backend = session.backend
    job = backend.install_job
    if job is not None and job.running:
        return f"Installing: {job.status}"
    if backend.check_job is not None and backend.check_job.running:
        return "Checking backend..."
    return backend.check_line or "Backend not checked"


def torch_version() -> str | None:
    """torch's version if it is imported in this session or the last check found it; never imports it."""
    module = sys.modules.get("torch")
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    check = session.backend.last_check
    return check["torch"] if check and check.get("torch") else None


def frame_ms(obj) -> str | None:
    """'<total> ms (avatar a + raster r + ...)' of the avatar's last rendered frame, if any."""
    stages = session.caches.timings.get(object_key(obj))
    if not stages:
        return None
    parts = " + ".join(f"{name} {ms:.0f}" for name, ms in stages.items())
    return f"{sum(stages.values()):.0f} ms per frame ({parts})"


class HDA_OT_select_avatar(bpy.types.Operator):
    """Make this avatar the active object (and the only selected one)"""

    bl_idname = "hda.select_avatar"
    bl_label = "Select Avatar"
    bl_options = {'REGISTER', 'UNDO'}

    name: StringProperty(name="Avatar", default="")

    @classmethod
    def poll(cls, context):
        return context.mode == 'OBJECT'

    def execute(self, context):
        obj = context.scene.objects.get(self.name)
        if obj is None or avatar_of(obj) is not obj:
            self.report({'ERROR'}, f"No HDA avatar named '{self.name}' in this scene")
            return {'CANCELLED'}
        for other in context.view_layer.objects.selected:
            other.select_set(False)
        obj.select_set(True)
        context.view_layer.objects.active = obj
        return {'FINISHED'}


class HDA_PT_main(bpy.types.Panel):
    bl_idname = "HDA_PT_main"
    bl_label = "HDA Avatars"
    bl_space_type = 'VIEW_3D'
    bl_region_type = 'UI'
    bl_category = "HDA"

    def draw(self, context):
        layout = self.layout
        active = avatar_of(context.active_object)
        self._avatars(layout, context, active)
        if active is not None:
            self._identity(layout, active)
            self._files(layout, context, active)
        self._backend(layout, context, active)

    def _avatars(self, layout, context, active):
        box = layout.box()
        row = box.row()
        row.label(text="Avatars", icon='ARMATURE_DATA')
        row.operator("hda.add_avatar", text="Add", icon='ADD')
        avatars = all_avatars(context.scene)
        if not avatars:
            box.label(text="No avatars in this scene")
        col = box.column(align=True)
        for obj in avatars:
            row = col.row(align=True)
            op = row.operator("hda.select_avatar", text=obj.name, depress=obj is active,
                              icon='RADIOBUT_ON' if obj is active else 'RADIOBUT_OFF')
            op.name = obj.name
            row.prop(obj.hda, "enabled", text="", icon='RESTRICT_RENDER_OFF' if obj.hda.enabled else 'RESTRICT_RENDER_ON')
        if active is None and avatars:
            box.label(text="Select an avatar to edit it", icon='INFO')

    def _identity(self, layout, obj):
        h = obj.hda
        box = layout.box()
        box.label(text=f"Identity: {obj.name}", icon='USER')
        row = box.row(align=True)
        row.prop(h, "seed")
        row.operator("hda.sample_identity", text="", icon='FILE_REFRESH').random = True
        col = box.column(align=True)
        col.prop(h, "seed_b")
        col.prop(h, "identity_mix", slider=True)
        box.operator("hda.sample_identity", text="Sample Identity", icon='COMMUNITY')
        if busy(obj):
            box.label(text="Sampling the new identity...", icon='TIME')
        elif h.sampled:
            box.label(text="Seeds and mix resample live", icon='CHECKMARK')
        if model_path() is None:
            box.label(text="No diffusion model yet: seeds show", icon='INFO')
            box.label(text="untrained (consistent-init) identities")

    def _files(self, layout, context, obj):
        h = obj.hda
        box = layout.box()
        box.label(text="Avatar File", icon='FILE')
        box.prop(h, "avatar_path", text="")
        box.operator("hda.load_avatar", icon='FILEBROWSER')
        error = session.caches.errors.get(object_key(obj))
        if error:
            box.label(text=error, icon='ERROR')

        fit = session.fit
        box = layout.box()
        box.label(text="Fit to a Capture", icon='OUTLINER_OB_CAMERA')
        settings = context.window_manager.hda_fit
        job = fit.job
        if fit.running:
            box.label(text=f"{fit.subject} onto {fit.avatar}")
            box.progress(factor=job.fraction, type='BAR', text=job.status())
            box.operator("hda.cancel_fit", icon='CANCEL')
        else:
            box.prop(settings, "subject")
            row = box.row()
            row.prop(settings, "preset", text="")
            row.prop(settings, "steps")
            box.operator("hda.fit_subject", icon='PLAY')
            if fit.line:
                ok = job is not None and job.state == "DONE"
                box.label(text=fit.line, icon='CHECKMARK' if ok else 'INFO')

        box = layout.box()
        box.label(text="Motion and Export", icon='ANIM')
        box.operator("hda.import_motion", icon='IMPORT')
        box.operator("hda.export_ply", icon='EXPORT')
        box.operator("hda.bake_layer", icon='RENDER_ANIMATION')
        box.operator("hda.check_farm", icon='CHECKMARK')
        if session.farm.checked:
            box.label(text=session.farm.line, icon='ERROR' if session.farm.lines else 'CHECKMARK')

    def _backend(self, layout, context, obj):
        box = layout.box()
        row = box.row()
        row.label(text="Backend", icon='SYSTEM')
        row.operator("preferences.addon_show", text="", icon='PREFERENCES').module = addon_id()
        box.label(text=status_line(), icon='CHECKMARK' if session.backend.check_ok else 'INFO')
        version = torch_version()
        box.label(text=f"torch {version}" if version else "torch: not loaded yet")
        if session.backend.kernels_line:
            ready = session.backend.kernels_line == "kernels ready"
            box.label(text=session.backend.kernels_line, icon='CHECKMARK' if ready else 'SORTTIME')
        if obj is not None:
            box.prop(obj.hda, "device")
            if bpy.app.version >= NATIVE_BLENDER_MIN:
                box.prop(obj.hda, "render_path")
            timing = frame_ms(obj)
            if timing:
                box.label(text=timing)
            box.label(text=frame_cache_line())
            shown = session.viewport.stats.get(object_key(obj))
            if shown:
                box.label(text=f"viewport: {shown['ms']:.0f} ms at {100 * shown['scale']:.0f}% size")
            ahead = session.viewport.ahead.get(object_key(obj))
            if ahead is not None:  # while playing: why playback may be less smooth
                box.label(text=AHEAD_ON if ahead else AHEAD_OFF, icon='CHECKMARK' if ahead else 'INFO')
        prefs = get_prefs(context)
        if prefs is not None:  # where animators look while playing, beside the viewport's timing
            box.prop(prefs, "playback_lod")
        box.operator("hda.check_backend", icon='FILE_REFRESH')


CLASSES = (HDA_OT_select_avatar, HDA_PT_main)
