"""Application handlers: the avatars' compositing layers follow every frame Blender renders.

Order Blender calls them in (measured on bpy 5.0 for a still and an animation render in background
mode; the 4.2 test renders through the same path):
``render_init`` once, then per frame ``render_pre``, ``frame_change_post(scene, depsgraph)`` with
the *render pipeline's* depsgraph evaluated at that frame (the view layer's depsgraph is not
advanced in background renders, so it would give frame 1's pose every time), the render and the
compositor, ``render_post``; finally ``render_complete`` or ``render_cancel``. So the layer of a
frame is written in ``frame_change_post`` while ``render_pre`` has marked a render in progress.

Outside renders, ``frame_change_post`` refreshes the layer of the frame the user steps or scrubs to
(the compositor backdrop and the viewport compositor show it), but not during playback or in
background scripts, where nobody looks at the compositor and a frame costs a full-size render.

All handlers are ``@persistent`` (they survive File > Open) and synchronous: timers do not run in
``blender -b``. :func:`unregister` removes exactly the functions :func:`register` added.

No handler lets an exception escape into Blender, whatever the engine (Workbench, EEVEE, Cycles):
a failure becomes one line on stderr and in the sidebar (session.caches.errors). A failure that
would leave the person out of a render (a bad avatar file, no backend, no camera) fails that
render: in ``blender -b`` the process exits with status 1 after the line (Blender offers Python no
other way to abort a render and the compositor cannot fail one; raising SystemExit from a handler
works on 5.0 but crashes Blender 4.2 mid-render, so the process ends itself), and in the interface the frame
shows magenta where the missing layer is (compositor.py) while the sidebar shows the error.
"""

import os
import sys

import bpy
from bpy.app.handlers import persistent

from . import compositor, layers, proxy, runtime, session
from .messages import error_text
from .objects import scene_avatars
from .paths import keep_with_blend, relative_path


def _report(scene, failures, rendering: bool, notes=()) -> None:
    """Print each note and failure; in a background render, exit with the first failure (the render failed)."""
    for line in notes:
        print(f"HDA Avatars: frame {scene.frame_current}: {line}", file=sys.stderr, flush=True)
    lines = [f"HDA Avatars: frame {scene.frame_current}: {line}" for line in failures]
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    if lines and rendering and bpy.app.background:
        print(lines[0] + " (render failed)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def _guarded(scene, step, rendering: bool) -> None:
    """Run ``step()``; an unexpected error is reported like a failed avatar, never raised into Blender."""
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - a handler must survive anything
        _report(scene, [error_text(exc)], rendering)


def _playing() -> bool:
    wm = getattr(bpy.context, "window_manager", None)
    return any(w.screen.is_animation_playing for w in getattr(wm, "windows", ()) if w.screen)


@persistent
def on_frame_change(scene, depsgraph=None):
    if not scene_avatars(scene) or depsgraph is None:
        return
    rendering = session.render.rendering
    if not rendering and (bpy.app.background or _playing()):
        return
    def update():
        failures, notes = layers.update_scene(scene, depsgraph)
        _report(scene, failures, rendering, notes)

    _guarded(scene, update, rendering)


@persistent
def on_render_init(scene, *_):
    # Also drops the layers of avatars disabled since the last sync.
    _guarded(scene, lambda: compositor.sync(scene), True)
    _guarded(scene, lambda: _hide_proxies(scene), True)


def _hide_proxies(scene) -> None:
    proxy.show(bpy.data.objects, session.render.hidden_proxies)  # left hidden by a render that never completed
    session.render.hidden_proxies = proxy.hide_for_engine(scene, scene_avatars(scene))


@persistent
def on_render_done(scene, *_):
    session.render.rendering = False
    _guarded(scene, lambda: proxy.show(bpy.data.objects, session.render.hidden_proxies), False)
    session.render.hidden_proxies = []


@persistent
def on_render_pre(scene, *_):
    session.render.rendering = True


@persistent
def on_render_post(scene, *_):
    session.render.rendering = False


@persistent
def on_load_post(*_):
    runtime.clear()


def _keep_with_blend(obj, path: str, target: str) -> str:
    try:
        return keep_with_blend(path, target)
    except OSError as exc:  # a full or read-only disk must not stop the save: the path stays as it was
        print(f"HDA Avatars: {obj.name}: avatar file {path} not copied beside {target} ({exc})", file=sys.stderr)
        return path


@persistent
def on_save_pre(filepath="", *_):
    """Copy avatar files from outside the project into its ``hda_avatars/`` (paths.keep_with_blend),
    store avatar, body and model paths '//'-relative to where the file is being saved, and point the
    layer images there too, so the saved folder renders on another machine."""
    target = filepath if isinstance(filepath, str) and filepath else bpy.data.filepath
    if target:
        _guarded(bpy.context.scene, lambda: _store_paths(target), False)


@persistent
def on_save_post(filepath="", *_):
    """After File › Save Copy the open file is still the original, so the paths stored for the copy go
    back to what they were and the compositor reads the original's layers again."""
    before, session.render.before_save = session.render.before_save, None
    if before is None or os.path.abspath(before[0]) == os.path.abspath(bpy.data.filepath or before[0]):
        return
    _guarded(bpy.context.scene, lambda: _restore_paths(before[1]), False)


def _restore_paths(values) -> None:
    for name, prop, value in values:
        obj = bpy.data.objects.get(name)
        if obj is not None and obj.hda.is_avatar:
            setattr(obj.hda, prop, value)
    if bpy.data.filepath:
        for scene in bpy.data.scenes:
            compositor.retarget(scene, bpy.data.filepath)


def _store_paths(target: str) -> None:
    values = []
    session.render.before_save = (target, values)
    for obj in bpy.data.objects:
        if obj.type != 'ARMATURE' or not obj.hda.is_avatar:
            continue
        for prop in ("avatar_path", "body_path", "identity_model"):
            value = getattr(obj.hda, prop).strip()
            if not value:
                continue
            values.append((obj.name, prop, getattr(obj.hda, prop)))
            absolute = bpy.path.abspath(value)
            if prop == "avatar_path":
                absolute = _keep_with_blend(obj, absolute, target)
            relative = relative_path(absolute, target)
            if relative != value:
                setattr(obj.hda, prop, relative)
    for scene in bpy.data.scenes:
        compositor.retarget(scene, target)  # also gives a duplicate saved now its own uid and layer folder


HANDLERS = (
    ("frame_change_post", on_frame_change),
    ("render_init", on_render_init),
    ("render_pre", on_render_pre),
    ("render_post", on_render_post),
    ("render_complete", on_render_done),
    ("render_cancel", on_render_done),
    ("load_post", on_load_post),
    ("save_pre", on_save_pre),
    ("save_post", on_save_post),
)


def register() -> None:
    for name, func in HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if func not in handlers:
            handlers.append(func)


def unregister() -> None:
    for name, func in HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        while func in handlers:
            handlers.remove(func)
    session.render.reset()
