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
"""

import sys

import bpy
from bpy.app.handlers import persistent

from . import compositor, layers, proxy, runtime, session
from .objects import scene_avatars
from .paths import relative_path


def _report(scene, failures) -> None:
    for line in failures:
        print(f"HDA Avatars: frame {scene.frame_current}: {line}", file=sys.stderr)


def _playing() -> bool:
    wm = getattr(bpy.context, "window_manager", None)
    return any(w.screen.is_animation_playing for w in getattr(wm, "windows", ()) if w.screen)


@persistent
def on_frame_change(scene, depsgraph=None):
    if not scene_avatars(scene) or depsgraph is None:
        return
    if not session.render.rendering and (bpy.app.background or _playing()):
        return
    _report(scene, layers.update_scene(scene, depsgraph))


@persistent
def on_render_init(scene, *_):
    compositor.sync(scene)  # also drops the layers of avatars disabled since the last sync
    proxy.show(bpy.data.objects, session.render.hidden_proxies)  # left hidden by a render that never completed
    session.render.hidden_proxies = proxy.hide_for_engine(scene, scene_avatars(scene))


@persistent
def on_render_done(scene, *_):
    session.render.rendering = False
    proxy.show(bpy.data.objects, session.render.hidden_proxies)
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


@persistent
def on_save_pre(filepath="", *_):
    """Store avatar and body paths '//'-relative to where the file is being saved, and point the
    layer images there too, so the saved file renders on another machine."""
    target = filepath if isinstance(filepath, str) and filepath else bpy.data.filepath
    if not target:
        return
    for obj in bpy.data.objects:
        if obj.type != 'ARMATURE' or not obj.hda.is_avatar:
            continue
        for prop in ("avatar_path", "body_path"):
            value = getattr(obj.hda, prop).strip()
            if not value:
                continue
            relative = relative_path(bpy.path.abspath(value), target)
            if relative != value:
                setattr(obj.hda, prop, relative)
    for scene in bpy.data.scenes:
        compositor.retarget(scene, target)


HANDLERS = (
    ("frame_change_post", on_frame_change),
    ("render_init", on_render_init),
    ("render_pre", on_render_pre),
    ("render_post", on_render_post),
    ("render_complete", on_render_done),
    ("render_cancel", on_render_done),
    ("load_post", on_load_post),
    ("save_pre", on_save_pre),
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
