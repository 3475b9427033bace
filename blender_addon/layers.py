"""The avatars' compositing layers: one multi-layer EXR per avatar and frame (RGBA + depth).

Files live in ``//hda_layers/<avatar uid>/layer_<frame>.exr`` next to the saved .blend (in Blender's
temporary folder while the file is unsaved). The compositor reads them as an image sequence
(compositor.py), so a render of the saved file needs no add-on code: render farms use the frames
written by *Bake Avatar Layer*; with the add-on installed, every rendered frame rewrites its file
from the armature's evaluated pose just before Blender composites it.
"""

import os

import bpy
import numpy as np

from ..hda_backend.exr import layer_channels, write_exr
from . import runtime, session
from .messages import error_text
from .objects import object_key, scene_avatars

LAYER_DIR = "//hda_layers"
IMAGE_PREFIX = "HDA Layer "


def layer_dir(blend_path: str | None = None) -> str:
    """The layer folder, absolute: next to the .blend (``blend_path``, default the open file), or in
    Blender's temporary folder while the file is unsaved."""
    blend = blend_path if blend_path is not None else bpy.data.filepath
    if blend:
        return os.path.join(os.path.dirname(os.path.abspath(blend)), LAYER_DIR[2:])
    return os.path.join(bpy.app.tempdir or os.path.join(os.path.expanduser("~"), ".cache"), "hda_layers")


def frame_path(obj, frame: int, blend_path: str | None = None) -> str:
    """Absolute path of the avatar's layer file for ``frame``."""
    return os.path.join(layer_dir(blend_path), obj.hda.uid or obj.name, f"layer_{frame:04d}.exr")


def stored_path(obj, frame: int, blend_path: str | None = None) -> str:
    """``frame_path`` as an Image datablock stores it: '//'-relative when the .blend is saved."""
    blend = blend_path if blend_path is not None else bpy.data.filepath
    if blend:
        return "//" + "/".join((LAYER_DIR[2:], obj.hda.uid or obj.name, f"layer_{frame:04d}.exr"))
    return frame_path(obj, frame, blend_path)


def render_size(scene) -> tuple[int, int]:
    """The render's pixel size: resolution × percentage, as Blender rounds it."""
    r = scene.render
    return max(1, r.resolution_x * r.resolution_percentage // 100), max(1, r.resolution_y * r.resolution_percentage // 100)


def image_name(obj) -> str:
    return IMAGE_PREFIX + (obj.hda.uid or obj.name)


def write_empty(obj, scene, frame: int, blend_path: str | None = None) -> str:
    """A fully transparent layer (depth behind everything) for ``frame``."""
    w, h = render_size(scene)
    rgba = np.zeros((h, w, 4), np.float32)
    depth = np.full((h, w), runtime.DEPTH_FAR, np.float32)
    return str(write_exr(frame_path(obj, frame, blend_path), layer_channels(rgba, depth)))


def write_frame(obj, scene, depsgraph, frame: int) -> str:
    """Render the avatar ``obj`` as evaluated in ``depsgraph`` with the scene camera and write its
    layer file for ``frame``. Raises HDAError for bad input."""
    w, h = render_size(scene)
    camera = depsgraph.scene_eval.camera or scene.camera
    rgba, depth = runtime.render_avatar(obj, depsgraph, camera, w, h)
    return str(write_exr(frame_path(obj, frame), layer_channels(rgba, depth)))


def update_scene(scene, depsgraph, frame: int | None = None) -> list[str]:
    """Write this frame's layer of every enabled avatar of ``scene`` and make the compositor re-read
    it. An avatar that fails (missing file, no camera) gets an empty layer and its error is kept in
    session.caches.errors and returned (the caller reports it: handlers print, operators report)."""
    frame = scene.frame_current if frame is None else frame
    failures = []
    for obj in scene_avatars(scene):
        try:
            write_frame(obj, scene, depsgraph, frame)
        except Exception as exc:  # noqa: BLE001 - one avatar failing must not stop the render
            message = error_text(exc)
            session.caches.errors[object_key(obj)] = message
            failures.append(f"{obj.name}: {message}")
            write_empty(obj, scene, frame)
        image = bpy.data.images.get(image_name(obj))
        if image is not None:
            image.reload()  # the sequence may hold an older version of this frame
    return failures
