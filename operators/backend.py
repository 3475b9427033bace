"""hda.check_backend, hda.install_backend, hda.cancel_install.

Both long actions run in a child process (deps.Job) so Blender stays responsive: the check is a modal
operator polling on window timer events (it reports into the info bar when done); the install is
polled by a bpy.app.timers timer (it outlives the preferences window) and can be cancelled. In
background mode (``blender -b``, bpy as a module) no timer runs, so both wait for their child process
instead. Nothing here touches bpy off the main thread: the job's reader thread only queues text.
"""

import os
import sys
import time

import bpy
from bpy.props import StringProperty

from ..blender_addon.api import EXT_ROOT, deps, probe, session
from ..blender_addon.api import preferences as prefs_mod

CHECK_TIMEOUT_S = 180.0     # importing torch the first time after an install can be slow
INSTALL_TIMEOUT_S = 3600.0  # background mode only (the UI install can be cancelled by hand)


def _must_block() -> bool:
    """True where no timer or modal handler will ever run (``blender -b``, bpy as a module): the
    operators then wait for their child process. Tests replace it to drive the interactive path."""
    return bpy.app.background


def _redraw(context=None):
    wm = getattr(context or bpy.context, "window_manager", None)
    for window in getattr(wm, "windows", ()):
        for area in window.screen.areas:
            if area.type in {'PREFERENCES', 'VIEW_3D'}:
                area.tag_redraw()


def _finish_check(job):
    result = probe.parse(job.lines)
    session.backend.last_check = result
    session.backend.check_ok, session.backend.check_line = probe.describe(result, job.lines)
    if job.state == deps.CANCELLED:
        session.backend.check_line = "backend check cancelled"
    elif result is None:
        job.state = deps.FAILED
    else:
        job.state = deps.DONE
    job.message = session.backend.check_line


def start_check(context):
    argv, env = probe.command(sys.path, EXT_ROOT, prefs_mod.body_path(context))
    job = deps.Job(argv, env=env, describe=None, on_exit=_finish_check).start()
    session.backend.check_job = job
    return job


class HDA_OT_check_backend(bpy.types.Operator):
    """Check whether torch imports with Blender's Python (version, device) and whether the body loads"""

    bl_idname = "hda.check_backend"
    bl_label = "Check Backend"
    bl_options = {'REGISTER'}  # reads only: no undo step

    _timer = None
    _started = 0.0

    @classmethod
    def poll(cls, context):
        return session.backend.check_job is None or not session.backend.check_job.running

    def execute(self, context):
        try:
            job = start_check(context)
        except OSError as exc:
            self.report({'ERROR'}, f"Could not start the backend check: {exc}")
            return {'CANCELLED'}
        job.wait(timeout=CHECK_TIMEOUT_S)
        return self._done(context)

    def invoke(self, context, event):
        if _must_block() or context.window is None:
            return self.execute(context)
        try:
            start_check(context)
        except OSError as exc:
            self.report({'ERROR'}, f"Could not start the backend check: {exc}")
            return {'CANCELLED'}
        self._started = time.monotonic()
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.25, window=context.window)
        wm.modal_handler_add(self)
        _redraw(context)
        return {'RUNNING_MODAL'}

    def modal(self, context, event):
        if event.type != 'TIMER':
            return {'PASS_THROUGH'}
        job = session.backend.check_job
        if job is None:  # add-on disabled meanwhile
            self._remove_timer(context)
            return {'CANCELLED'}
        if job.running and time.monotonic() - self._started > CHECK_TIMEOUT_S:
            job.cancel()
        if job.poll() == deps.RUNNING:
            return {'PASS_THROUGH'}
        self._remove_timer(context)
        return self._done(context)

    def cancel(self, context):
        if session.backend.check_job is not None and session.backend.check_job.running:
            session.backend.check_job.cancel()
            session.backend.check_job.wait(timeout=10)  # joins the reader so the job ends as CANCELLED
        self._remove_timer(context)

    def _remove_timer(self, context):
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None

    def _done(self, context):
        _redraw(context)
        job = session.backend.check_job
        if job.state != deps.DONE:
            self.report({'ERROR'}, session.backend.check_line)
            return {'CANCELLED'}
        body_ok = bool(session.backend.last_check and session.backend.last_check["body_ok"])
        self.report({'INFO'} if session.backend.check_ok and body_ok else {'WARNING'}, session.backend.check_line)
        return {'FINISHED'}


def _install_tick():
    """bpy.app.timers callback: poll the install job, redraw, finish when it ends."""
    job = session.backend.install_job
    if job is None:
        return None
    if job.poll() == deps.RUNNING:
        _redraw()
        return 0.5
    _after_install(job)
    _redraw()
    return None


def _after_install(job):
    session.backend.install_line = job.message
    if job.state == deps.DONE:
        prefs_mod.sync_sys_path()
        if "torch" in sys.modules:
            session.backend.install_line += "; restart Blender to use the new packages"
    print(f"HDA Avatars: backend install {job.state.lower()}: {job.message}")


class HDA_OT_install_backend(bpy.types.Operator):
    """Install the backend's pinned packages (PyTorch, smplx, gsplat, ...) into this extension's user
    folder with pip, keeping Blender's own numpy"""

    bl_idname = "hda.install_backend"
    bl_label = "Install Backend"
    bl_options = {'REGISTER'}  # changes no Blender data: no undo step

    packages: StringProperty(
        name="Packages", default="", options={'HIDDEN', 'SKIP_SAVE'},
        description="Requirement specifiers separated by spaces, replacing the pinned set (advanced)")

    @classmethod
    def poll(cls, context):
        return session.backend.install_job is None or not session.backend.install_job.running

    def execute(self, context):
        prefs = prefs_mod.get_prefs(context)
        wheel_dir = bpy.path.abspath(prefs.wheel_dir.strip()) if prefs and prefs.wheel_dir.strip() else None
        if wheel_dir and not os.path.isdir(wheel_dir):
            self.report({'ERROR'}, f"Local wheel folder not found: {wheel_dir}")
            return {'CANCELLED'}
        if not wheel_dir and not bpy.app.online_access:
            self.report({'ERROR'}, "Online access is disabled (Preferences > System > Network): allow it, "
                                   "or set a local wheel folder")
            return {'CANCELLED'}
        packages = tuple(self.packages.split()) or deps.PINNED
        try:
            job = deps.start_install(prefs_mod.deps_dir(), packages, wheel_dir=wheel_dir,
                                     variant=prefs.torch_variant if prefs else 'CPU')
        except (OSError, RuntimeError, ValueError) as exc:
            self.report({'ERROR'}, f"Could not start pip: {exc}")
            return {'CANCELLED'}
        session.backend.install_job, session.backend.install_line = job, ""
        if _must_block():  # no timers run: install synchronously
            job.wait(timeout=INSTALL_TIMEOUT_S)
            _after_install(job)
            if job.state != deps.DONE:
                self.report({'ERROR'}, f"Backend install {job.state.lower()}: {job.message}")
                return {'CANCELLED'}
            self.report({'INFO'}, f"Backend {job.message}")
            return {'FINISHED'}
        if not bpy.app.timers.is_registered(_install_tick):
            bpy.app.timers.register(_install_tick, first_interval=0.5)
        self.report({'INFO'}, "Installing the backend in the background (progress in the add-on's preferences)")
        _redraw(context)
        return {'FINISHED'}


class HDA_OT_cancel_install(bpy.types.Operator):
    """Stop the running backend install; the previously installed packages stay as they were"""

    bl_idname = "hda.cancel_install"
    bl_label = "Cancel Install"
    bl_options = {'REGISTER'}

    @classmethod
    def poll(cls, context):
        return session.backend.install_job is not None and session.backend.install_job.running

    def execute(self, context):
        session.backend.install_job.cancel()
        self.report({'INFO'}, "Backend install cancelled")
        return {'FINISHED'}


def stop_jobs():
    """Unregister: cancel running child processes and remove the timer (unregister then forgets the
    session's state, session.reset)."""
    for job in (session.backend.install_job, session.backend.check_job):
        if job is not None and job.running:
            job.cancel()
            job.wait(timeout=10)
    while bpy.app.timers.is_registered(_install_tick):
        bpy.app.timers.unregister(_install_tick)
