"""Add-on preferences: body model path, backend status, dependency install, existing environment."""

import importlib
import os

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from . import deps, session
from .paths import addon_id, user_dir


def get_prefs(context=None):
    addon = (context or bpy.context).preferences.addons.get(addon_id())
    return addon.preferences if addon is not None else None


def deps_dir() -> str:
    """The extension's user folder for installed backend packages (kept across upgrades)."""
    return user_dir("deps")


def body_path(context=None):
    """The body model file from the preferences (absolute), or None: then the backend falls back to
    $HDA_SMPLX_PATH, then the bundled open body (hda_backend.body.resolve_body_path)."""
    prefs = get_prefs(context)
    if prefs is None or not prefs.body_path.strip():
        return None
    return os.path.abspath(os.path.expanduser(bpy.path.abspath(prefs.body_path.strip())))


FRAME_CACHE_MB = 256   # default frame cache: about 340 frames at 256x256, 10 at 1920x1080 (12 bytes a pixel)


def frame_cache_bytes(context=None) -> int:
    """The frame cache's budget in bytes (the preference; 0: the cache is off)."""
    prefs = get_prefs(context)
    return (prefs.frame_cache_mb if prefs is not None else FRAME_CACHE_MB) * 2**20


def frame_cache_line() -> str:
    """'Frame cache: H hits, M misses, U of B MB' (or 'off') for the panel and the preferences."""
    caches, prefs = session.caches, get_prefs()
    budget = prefs.frame_cache_mb if prefs is not None else FRAME_CACHE_MB
    counts = f"{caches.stats['hits']} hits, {caches.stats['misses']} misses"
    if budget == 0:
        return f"Frame cache: off ({counts})"
    return f"Frame cache: {counts}, {caches.frame_bytes / 2**20:.0f} of {budget} MB"


def playback_lod(context=None) -> bool:
    """The viewport's level of detail while the pose or view moves (the preference; on by default)."""
    prefs = get_prefs(context)
    return prefs.playback_lod if prefs is not None else True


def _frame_cache_changed(self, context):
    session.caches.trim(self.frame_cache_mb * 2**20)


def environment_path(prefs):
    if prefs is None or not prefs.python_path.strip():
        return None
    found = deps.resolve_site_packages(bpy.path.abspath(prefs.python_path.strip()))
    return str(found) if found else None


def sync_sys_path(prefs=None) -> None:
    """Append the deps folder and the chosen environment to sys.path (after Blender's own entries, so
    Blender's numpy wins); drop entries this add-on added earlier and no longer wants."""
    prefs = prefs or get_prefs()
    wanted = [deps_dir()] + [p for p in (environment_path(prefs),) if p]
    added = session.registration.sys_paths  # entries this add-on appended (removed again by unregister)
    stale = [p for p in added if p not in wanted]
    deps.remove_paths(stale)
    added[:] = [p for p in added if p not in stale]
    added.extend(deps.append_paths(wanted))
    importlib.invalidate_caches()


def forget_sys_path() -> None:
    added = session.registration.sys_paths
    deps.remove_paths(added)
    added.clear()


def _paths_changed(self, context):
    sync_sys_path(self)


class HDA_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = addon_id()

    body_path: StringProperty(
        name="Body Model", subtype='FILE_PATH',
        description="SMPL-X-format body file (SMPLX_NEUTRAL.npz) or the folder holding it. Empty: "
                    "$HDA_SMPLX_PATH if set, else the bundled open body")
    python_path: StringProperty(
        name="Existing Environment", subtype='DIR_PATH', update=_paths_changed,
        description="site-packages folder (or venv/conda root) of a Python matching Blender's, with the "
                    "backend packages installed; appended to Blender's module path")
    torch_variant: EnumProperty(
        name="PyTorch Build", default='CPU',
        items=(('CPU', "CPU", "PyTorch CPU build (smaller download, works everywhere)"),
               ('CUDA', "CUDA", "PyTorch CUDA build for NVIDIA GPUs (large download)")))
    wheel_dir: StringProperty(
        name="Local Wheel Folder", subtype='DIR_PATH',
        description="Install offline from wheels in this folder (pip --no-index --find-links) "
                    "instead of downloading")

    frame_cache_mb: IntProperty(
        name="Frame Cache (MB)", default=FRAME_CACHE_MB, min=0, soft_max=8192, update=_frame_cache_changed,
        description="Memory for rendered avatar frames kept for scrubbing back and re-rendering (each frame "
                    "costs 12 bytes a pixel); 0 turns the cache off")

    playback_lod: BoolProperty(
        name="Fast Playback Preview", default=True,
        description="While the playhead or the view moves, run the avatar's network on every other frame "
                    "and re-skin its output in between (about twice the frame rate on a CPU; while an "
                    "action plays the network runs ahead and the frames between interpolate, otherwise "
                    "the pose-dependent detail is one frame behind; either may differ visibly in fast "
                    "motions). Off: every frame at full quality. The image once the playhead stops is "
                    "full quality either way")

    def draw(self, context):
        layout = self.layout

        box = layout.box()
        box.label(text="Body Model", icon='ARMATURE_DATA')
        box.prop(self, "body_path")
        check = session.backend.last_check
        if check is None:
            box.label(text="Status: press Check Backend")
        else:
            box.label(text=f"Status: {check['body']}", icon='CHECKMARK' if check["body_ok"] else 'ERROR')

        box = layout.box()
        row = box.row()
        row.label(text="Backend", icon='SYSTEM')
        row.operator("hda.check_backend", icon='FILE_REFRESH')
        job = session.backend.check_job
        if job is not None and job.running:
            box.label(text="Checking...", icon='SORTTIME')
        elif check is not None:
            if check["torch"]:
                box.label(text=f"torch {check['torch']} on {check['device']}", icon='CHECKMARK')
                box.label(text=f"from {os.path.dirname(check['torch_file'] or '')}")
            else:
                box.label(text=f"torch does not import: {check['torch_error']}", icon='ERROR')
        elif session.backend.check_line:
            box.label(text=session.backend.check_line, icon='ERROR')
        if session.backend.kernels_line:
            box.label(text=f"Raster kernels: {session.backend.kernels_line}")

        box = layout.box()
        box.label(text="Backend Packages", icon='PACKAGE')
        job = session.backend.install_job
        if job is not None and job.running:
            row = box.row()
            row.label(text=job.status or "installing...", icon='SORTTIME')
            row.operator("hda.cancel_install", icon='CANCEL')
        else:
            col = box.column()
            if check is not None and check["torch"]:
                col.label(text="torch imports: no install needed")
            col.prop(self, "torch_variant")
            col.prop(self, "wheel_dir")
            if not self.wheel_dir and not bpy.app.online_access:
                col.label(text="Online access is off (Preferences > System > Network)", icon='INFO')
            col.operator("hda.install_backend", icon='IMPORT')
            if session.backend.install_line:
                ok = job is not None and job.state == deps.DONE
                col.label(text=session.backend.install_line, icon='CHECKMARK' if ok else 'ERROR')
        box.label(text=f"Install folder: {deps_dir()}")
        box.prop(self, "python_path")
        if self.python_path.strip() and environment_path(self) is None:
            box.label(text="Folder not found", icon='ERROR')

        box = layout.box()
        box.label(text="Rendering", icon='RENDER_ANIMATION')
        box.prop(self, "frame_cache_mb")
        box.label(text=frame_cache_line())
        box.prop(self, "playback_lod")


CLASSES = (HDA_AddonPreferences,)
