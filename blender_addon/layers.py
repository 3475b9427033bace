"""The avatars' compositing layers: one multi-layer EXR per avatar and frame (RGBA + depth + bake key).

Files live in ``//hda_layers/<.blend name>/<avatar uid>/layer_<frame>.exr`` next to the saved .blend
(``hda_layers/unsaved/`` in Blender's temporary folder while the file is unsaved): each saved file
and each avatar owns its layers, so two versions saved side by side with Save As, or a duplicated
avatar (which gets its own uid, objects.ensure_unique_uids), never write each other's files. The
compositor reads them as an image sequence (compositor.py), so a render of the saved file needs no
add-on code: render farms use the frames written by *Bake Avatar Layer*; with the add-on installed,
every rendered frame rewrites its file from the armature's evaluated pose just before Blender
composites it.

Files are written through one :class:`~hda_backend.layer_writer.LayerWriter` (session.render): the
frame handler's write stores the blocks raw, and the file is rewritten ZIP-compressed on a background
thread, the same image (why that never shows a wrong frame: hda_backend/layer_writer.py). *Bake*
waits for the rewrites (:func:`flush_writer`), so the files it leaves are final.

Each file carries its bake key in its header (hda_backend/bake_key.py; checked by farm.py). A file
without one is a *placeholder*: it exists only so that the image node knows the layer's passes,
and its depth is 0 everywhere, which the compositor paints as a missing layer, like a missing file.
An avatar that fails to render gets no file for that frame (an old one is deleted), never an empty
layer that would pass for "nobody here".
"""

import os

import bpy
import numpy as np

from ..hda_backend import bake_key
from ..hda_backend.errors import HDAError
from ..hda_backend.exr import layer_channels, read_strings
from ..hda_backend.layer_writer import LayerWriter
from . import bake_inputs, runtime, session
from .messages import error_text
from .objects import object_key, scene_avatars

LAYER_DIR = "//hda_layers"
UNSAVED = "unsaved"          # the file's folder name while the .blend has never been saved
IMAGE_PREFIX = "HDA Layer "


def _blend(blend_path: str | None) -> str:
    return blend_path if blend_path is not None else bpy.data.filepath


def file_folder(blend_path: str | None = None) -> str:
    """The name of the .blend's own layer folder: the file name without '.blend'."""
    blend = _blend(blend_path)
    name = os.path.basename(blend)
    return (name[:-6] if name.lower().endswith(".blend") else name) if blend else UNSAVED


def layer_dir(blend_path: str | None = None, root: str = LAYER_DIR) -> str:
    """The layer folder of one .blend, absolute: next to the .blend (``blend_path``, default the open
    file), or in Blender's temporary folder while the file is unsaved. ``root``: the '//'-relative
    folder of all files' layers (native_bake.py keeps its splat frames the same way)."""
    blend = _blend(blend_path)
    if blend:
        return os.path.join(os.path.dirname(os.path.abspath(blend)), root[2:], file_folder(blend))
    return os.path.join(bpy.app.tempdir or os.path.join(os.path.expanduser("~"), ".cache"), root[2:], UNSAVED)


def _writer() -> LayerWriter:
    if session.render.layer_files is None:
        session.render.layer_files = LayerWriter()
    return session.render.layer_files


def flush_writer() -> None:
    """Wait until every layer file written so far is in its final, compressed form (after a bake: the
    files a farm copies, and what *Check for Farm* and Save As see)."""
    if session.render.layer_files is not None:
        session.render.layer_files.flush()


def close_writer() -> None:
    """Finish the queued compressed rewrites and stop their thread (unregister)."""
    if session.render.layer_files is not None:
        session.render.layer_files.close()
        session.render.layer_files = None


def _frame_name(frame: int) -> str:
    return f"layer_{frame:04d}.exr"


def frame_path(obj, frame: int, blend_path: str | None = None) -> str:
    """Absolute path of the avatar's layer file for ``frame``."""
    return os.path.join(layer_dir(blend_path), obj.hda.uid or obj.name, _frame_name(frame))


def stored_path(obj, frame: int, blend_path: str | None = None) -> str:
    """``frame_path`` as an Image datablock stores it: '//'-relative when the .blend is saved."""
    blend = _blend(blend_path)
    if blend:
        return "//" + "/".join((LAYER_DIR[2:], file_folder(blend), obj.hda.uid or obj.name, _frame_name(frame)))
    return frame_path(obj, frame, blend_path)


def render_size(scene) -> tuple[int, int]:
    """The render's pixel size: resolution × percentage, as Blender rounds it."""
    r = scene.render
    return max(1, r.resolution_x * r.resolution_percentage // 100), max(1, r.resolution_y * r.resolution_percentage // 100)


def image_name(obj) -> str:
    return IMAGE_PREFIX + (obj.hda.uid or obj.name)


def write_placeholder(obj, scene, frame: int, blend_path: str | None = None) -> str:
    """A layer file with the layer's passes and no bake key, whose depth 0 the compositor paints as
    missing: lets the image node know its passes before anything is baked."""
    w, h = render_size(scene)
    rgba = np.zeros((h, w, 4), np.float32)
    depth = np.zeros((h, w), np.float32)
    return str(_writer().write(frame_path(obj, frame, blend_path), layer_channels(rgba, depth)))


def remove_frame(obj, frame: int) -> None:
    """Delete the avatar's layer file of ``frame`` (an avatar that failed to render has none)."""
    _writer().remove(frame_path(obj, frame))


def write_frame(obj, scene, depsgraph, frame: int) -> str:
    """Render the avatar ``obj`` as evaluated in ``depsgraph`` with the scene camera and write its
    layer file for ``frame``, keyed with what it shows. Raises HDAError for bad input."""
    w, h = render_size(scene)
    camera = depsgraph.scene_eval.camera or scene.camera
    rgba, depth = runtime.render_avatar(obj, depsgraph, camera, w, h)
    key = bake_key.encode(bake_inputs.identity(obj, w, h), bake_inputs.frame_inputs(obj, depsgraph, camera, w, h))
    return str(_writer().write(frame_path(obj, frame), layer_channels(rgba, depth), {bake_key.ATTRIBUTE: key}))


def baked_is_current(obj, scene, depsgraph, frame: int) -> bool:
    """Whether the avatar's layer file of ``frame`` exists and its bake key matches the avatar as
    evaluated in ``depsgraph`` (so it can stand in when the backend cannot render: a farm with the
    add-on but without torch or CUDA)."""
    w, h = render_size(scene)
    try:
        stored = read_strings(frame_path(obj, frame)).get(bake_key.ATTRIBUTE)
        camera = depsgraph.scene_eval.camera or scene.camera
        inputs = bake_inputs.frame_inputs(obj, depsgraph, camera, w, h)
        return bake_key.stale_reason(stored, bake_inputs.identity(obj, w, h), inputs) is None
    except HDAError:
        return False


def update_scene(scene, depsgraph, frame: int | None = None) -> tuple[list[str], list[str]]:
    """Write this frame's layer of every enabled avatar of ``scene`` and make the compositor re-read
    it. Returns (failures, notes), one line each. An avatar that fails (a bad avatar file, no camera,
    no backend) keeps a baked layer that is still current (a note), else gets no layer file for this
    frame (the compositor paints it as missing) and its error is kept in session.caches.errors and
    returned (the caller reports it: handlers fail the render, operators report)."""
    frame = scene.frame_current if frame is None else frame
    failures, notes = [], []
    for obj in scene_avatars(scene):
        try:
            write_frame(obj, scene, depsgraph, frame)
        except Exception as exc:  # noqa: BLE001 - one avatar failing must not stop the render
            message = error_text(exc)
            session.caches.errors[object_key(obj)] = message
            if baked_is_current(obj, scene, depsgraph, frame):
                notes.append(f"{obj.name}: {message}; its baked layer is current and is used")
            else:
                failures.append(f"{obj.name}: {message}")
                remove_frame(obj, frame)
        image = bpy.data.images.get(image_name(obj))
        if image is not None:
            image.reload()  # the sequence may hold an older version of this frame
    return failures, notes
