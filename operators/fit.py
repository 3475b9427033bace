"""hda.fit_subject / hda.cancel_fit: fit the active avatar to a capture subject in a child process.

The fit is ``hda fit`` run by blender_addon.fitjob in a child of Blender's interpreter, so Blender
never waits on it: the modal operator wakes on a window timer every 0.25 s, and each tick
(:func:`step`) only drains the child's output queue and reads the new lines of its metrics file,
well under 100 ms. Progress shows in the status bar's progress indicator (window_manager.progress_*)
and in the sidebar (a bar with the step and PSNR, and a Cancel button); Esc cancels too. Cancelling
terminates the child's process group; the fit's checkpoint keeps its progress, and fitting the same
subject into the same file again resumes it.

On success the avatar file is set as the avatar's ``avatar_path`` ('//'-relative once the .blend is
saved) and the runtime cache of that avatar is invalidated, so the viewport and renders use it.

Where the fit goes (``output`` empty): ``//hda_avatars/<subject>.hda.safetensors`` beside the saved
.blend, or the extension's user folder while the file is unsaved (a temporary folder would vanish
and leave the saved .blend pointing at nothing).

In background mode (``blender -b``, bpy as a module) no timer or modal handler ever runs, so the
operator waits for the child process and applies the result before returning.
"""

import os

import bpy
from bpy.props import EnumProperty, IntProperty, PointerProperty, StringProperty

from ..blender_addon.api import (EXT_ROOT, avatar_of, avatar_output_dir, deps, fitjob, poll_active_avatar,
                                 relative_path, runtime, session, user_dir)
from ..hda_backend.constants import FIT_MENU_ORDER, PRESET_FIT_TEXT, PRESET_LABELS

PRESETS = tuple((name, PRESET_LABELS[name], PRESET_FIT_TEXT[name]) for name in FIT_MENU_ORDER)
TICK_S = 0.25
BACKGROUND_TIMEOUT_S = 24 * 3600.0


def _must_block() -> bool:
    """True where no timer or modal handler will run (``blender -b``, bpy as a module)."""
    return bpy.app.background


def running() -> bool:
    return session.fit.running


def _find_avatar(name: str, uid: str):
    obj = bpy.data.objects.get(name)
    if obj is not None and obj.type == 'ARMATURE' and obj.hda.is_avatar and obj.hda.uid == uid:
        return obj
    return next((o for o in bpy.data.objects if o.type == 'ARMATURE' and o.hda.is_avatar and o.hda.uid == uid), None)


def _redraw(context=None):
    wm = getattr(context or bpy.context, "window_manager", None)
    for window in getattr(wm, "windows", ()):
        for area in window.screen.areas:
            if area.type == 'VIEW_3D':
                area.tag_redraw()


def start(context, obj, subject: str, *, preset: str = "cpu", steps: int = 0, output: str = "",
          init_from: str = "") -> fitjob.FitJob:
    """Start fitting ``subject`` for the avatar ``obj``; the job is in ``session.fit``."""
    subject = os.path.abspath(bpy.path.abspath(subject)).rstrip(os.sep)
    name = os.path.basename(subject) or "subject"
    out = (os.path.abspath(bpy.path.abspath(output)) if output.strip()
           else os.path.join(avatar_output_dir(), f"{name}{fitjob.AVATAR_SUFFIX}"))
    init = os.path.abspath(bpy.path.abspath(init_from)) if init_from.strip() else None
    cache = user_dir("numba_fit")
    job = fitjob.start_fit(subject, out, EXT_ROOT, preset=preset, steps=steps or None, init_from=init,
                           device=obj.hda.device, numba_cache=cache)
    fit = session.fit
    fit.job, fit.avatar, fit.uid, fit.subject, fit.line = job, obj.name, obj.hda.uid, name, ""
    return job


def step(context) -> str:
    """One tick: poll the job; when it has ended, load the result onto its avatar. Returns the job's
    state (deps.RUNNING, DONE, FAILED, CANCELLED); ``session.fit.line`` holds the outcome."""
    fit = session.fit
    job = fit.job
    if job is None:
        return deps.CANCELLED
    state = job.poll()
    if state == deps.RUNNING:
        return state
    if state != deps.DONE:
        fit.line = job.message
        return state
    obj = _find_avatar(fit.avatar, fit.uid)
    if obj is None:
        fit.line = f"{job.message}; the avatar '{fit.avatar}' is gone, load the file by hand"
        return deps.FAILED
    obj.hda.avatar_path = relative_path(str(job.files.avatar), bpy.data.filepath)
    obj.hda.sampled = False  # a fitted person: the identity controls no longer resample it
    runtime.invalidate(obj)
    fit.line = f"fitted {fit.subject} onto {obj.name}" + (
        f" (training-view PSNR {job.psnr:.1f} dB)" if job.psnr is not None else "")
    return state


def cancel() -> None:
    """Stop the running fit (the Cancel button, Esc, unregister)."""
    if session.fit.running:
        session.fit.job.cancel()


class HDA_FitSettings(bpy.types.PropertyGroup):
    """What the sidebar's Fit button fits (session UI state on the window manager, not saved)."""

    subject: StringProperty(name="Subject", subtype='DIR_PATH', default="",
                            description="A subject folder of a capture dataset (subject.json, cameras.json, images/ ...)")
    preset: EnumProperty(name="Preset", items=PRESETS, default="cpu")
    steps: IntProperty(name="Steps", default=0, min=0, description="Optimisation steps; 0: the preset's")


class HDA_OT_fit_subject(bpy.types.Operator):
    """Fit the active avatar to a capture subject in a background process (progress in the sidebar;
    Esc or Cancel stops it, fitting again resumes)"""

    bl_idname = "hda.fit_subject"
    bl_label = "Fit Subject"
    bl_options = {'REGISTER', 'UNDO'}

    subject: StringProperty(name="Subject", subtype='DIR_PATH', default="", options={'SKIP_SAVE'},
                            description="Subject folder; empty: the sidebar's")
    preset: EnumProperty(name="Preset", items=PRESETS + (("SIDEBAR", "Sidebar", "The sidebar's preset"),),
                         default="SIDEBAR", options={'SKIP_SAVE'})
    steps: IntProperty(name="Steps", default=-1, min=-1, options={'SKIP_SAVE'},
                       description="Optimisation steps; 0: the preset's; -1: the sidebar's")
    output: StringProperty(name="Output", subtype='FILE_PATH', default="", options={'SKIP_SAVE'},
                           description="The avatar file to write; empty: hda_avatars/<subject>.hda.safetensors")
    init_from: StringProperty(name="Start From", subtype='FILE_PATH', default="", options={'SKIP_SAVE'},
                              description="Start from this avatar's weights (faster)")

    _timer = None

    @classmethod
    def poll(cls, context):
        if running():
            cls.poll_message_set("A fit is running; cancel it first")
            return False
        return poll_active_avatar(cls, context)

    def _arguments(self, context):
        settings = context.window_manager.hda_fit
        subject = self.subject.strip() or settings.subject.strip()
        preset = settings.preset if self.preset == "SIDEBAR" else self.preset
        steps = settings.steps if self.steps < 0 else self.steps
        return subject, preset, steps

    def _start(self, context) -> bool:
        subject, preset, steps = self._arguments(context)
        if not subject:
            self.report({'ERROR'}, "Choose a subject folder to fit (sidebar > HDA > Fit)")
            return False
        folder = os.path.abspath(bpy.path.abspath(subject))
        if not os.path.isfile(os.path.join(folder, "subject.json")):
            self.report({'ERROR'}, f"{folder}: no subject.json, expected a subject folder of a capture dataset")
            return False
        try:
            start(context, avatar_of(context.active_object), folder, preset=preset, steps=steps,
                  output=self.output, init_from=self.init_from)
        except (OSError, ValueError) as exc:
            self.report({'ERROR'}, f"Could not start the fit: {exc}")
            return False
        return True

    def execute(self, context):
        if not self._start(context):
            return {'CANCELLED'}
        session.fit.job.wait(timeout=BACKGROUND_TIMEOUT_S)
        return self._done(step(context))

    def invoke(self, context, event):
        if _must_block() or context.window is None:
            return self.execute(context)
        if not self._start(context):
            return {'CANCELLED'}
        wm = context.window_manager
        self._timer = wm.event_timer_add(TICK_S, window=context.window)
        wm.modal_handler_add(self)
        wm.progress_begin(0, 100)
        _redraw(context)
        return {'RUNNING_MODAL'}

    def modal(self, context, event):
        if event.type == 'ESC' and event.value == 'PRESS':
            cancel()
            return {'RUNNING_MODAL'}  # the next tick reports the cancelled job
        if event.type != 'TIMER':
            return {'PASS_THROUGH'}
        state = step(context)
        job = session.fit.job
        context.window_manager.progress_update(int(100 * job.fraction) if job else 0)
        _redraw(context)
        if state == deps.RUNNING:
            return {'PASS_THROUGH'}
        self._finish(context)
        return self._done(state)

    def cancel(self, context):  # Blender calls this when the operator is aborted (file load, quit)
        cancel()
        self._finish(context)

    def _finish(self, context):
        wm = context.window_manager
        if self._timer is not None:
            wm.event_timer_remove(self._timer)
            self._timer = None
            wm.progress_end()

    def _done(self, state):
        _redraw()
        if state == deps.DONE:
            self.report({'INFO'}, session.fit.line)
            return {'FINISHED'}
        self.report({'WARNING'} if state == deps.CANCELLED else {'ERROR'}, session.fit.line)
        return {'CANCELLED'}


class HDA_OT_cancel_fit(bpy.types.Operator):
    """Stop the running fit; its checkpoint keeps the progress (fitting again resumes)"""

    bl_idname = "hda.cancel_fit"
    bl_label = "Cancel Fit"
    bl_options = {'REGISTER'}

    @classmethod
    def poll(cls, context):
        return running()

    def execute(self, context):
        cancel()
        return {'FINISHED'}


def register_properties():
    bpy.types.WindowManager.hda_fit = PointerProperty(type=HDA_FitSettings)


def unregister_properties():
    cancel()
    if session.fit.running:
        session.fit.job.wait(timeout=10)
    if hasattr(bpy.types.WindowManager, "hda_fit"):
        del bpy.types.WindowManager.hda_fit


CLASSES = (HDA_FitSettings, HDA_OT_fit_subject, HDA_OT_cancel_fit)
