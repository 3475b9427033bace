"""The native render path (Blender ≥ 5.3): each avatar owns a Gaussian-splat point cloud object that
Blender renders itself, in the viewport and in final renders, with the scene's depth, depth of
field, motion blur and view layers.

The splat object is parented to the avatar's armature (identity parent inverse), so its object frame
is the armature's; its attributes are the backend's Gaussians for the armature's *evaluated* pose,
converted by hda_backend.native_splats and written in bulk (``foreach_set``, no per-point Python),
widened for the scene camera at the render's resolution as the backend's rasterizer widens every
projected Gaussian (native_splats.camera_dilation: without it sub-pixel Gaussians thin out and the
match with the backend drops from 30 to 19 dB at 256², measured by scripts/native_match.py):
- on every frame change (playback, scrubbing, ``frame_set`` in scripts, F12 / ``blender -b -a``,
  where the handler receives the render pipeline's depsgraph at that frame);
- on depsgraph updates of an avatar armature or the scene camera while posing (not during renders).
A pose the splats already hold (same avatar signature, pose, camera and resolution) is not written again.

An avatar that fails (missing file, broken rig, no backend) shows its baked frame where that is
current (native_bake.py), else gets an empty point cloud; its error is kept in session.caches.errors
and printed, as for the compositing layer: never the previous pose silently.

The farm bake (native_bake.py): *Bake* writes each frame's splats beside the file and gives the splat
object a geometry-nodes modifier that loads them without the add-on; it is on in the saved file and
off while this add-on runs (the handlers below, register and unregister).

Imports no torch until an avatar is written (register() stays cheap). Blender 4.2-5.2 never run this
module's code (api.py imports it everywhere): register() is called only from Blender 5.3 on, and
``hda.native`` is false there whatever the saved render path says, so no avatar is native.
"""

from __future__ import annotations

import sys

import bpy
import numpy as np
from bpy.app.handlers import persistent

from . import native_bake, runtime, session
from .messages import error_text
from .objects import native_avatars, object_key

SPLAT_SUFFIX = "_splats"


def splat_object(obj):
    """The splat object of the avatar armature ``obj``, created (parented, in the armature's
    collections) when missing."""
    splats = obj.hda.splats
    # A duplicated armature still points at the original's splats: it gets its own.
    if splats is not None and splats.type == 'POINTCLOUD' and splats.name in bpy.data.objects and splats.parent == obj:
        return splats
    cloud = bpy.data.pointclouds.new(obj.name + SPLAT_SUFFIX)
    cloud.type = 'GAUSSIAN_SPLAT'
    splats = bpy.data.objects.new(obj.name + SPLAT_SUFFIX, cloud)
    for collection in obj.users_collection:
        collection.objects.link(splats)
    splats.parent = obj
    splats.matrix_parent_inverse.identity()
    splats.hide_select = True  # the proxy mesh selects the avatar
    obj.hda.splats = splats
    return splats


def remove_splats(obj) -> None:
    """Delete the avatar's splat object and its point cloud (back to the compositing layer)."""
    splats = obj.hda.splats
    obj.hda.splats = None
    session.native.written.pop(object_key(obj), None)
    if splats is None or splats.name not in bpy.data.objects:
        return
    cloud = splats.data
    bpy.data.objects.remove(splats)
    if cloud is not None and cloud.users == 0:
        bpy.data.pointclouds.remove(cloud)


def _fill(cloud, arrays: dict[str, np.ndarray], count: int) -> None:
    from ..hda_backend.native_splats import ATTRIBUTES

    if len(cloud.points) != count:
        cloud.resize(count)
    for name, kind, key in ATTRIBUTES:
        attribute = cloud.attributes.get(name)
        if attribute is None or attribute.data_type != kind or attribute.domain != 'POINT':
            if attribute is not None:
                cloud.attributes.remove(attribute)
            attribute = cloud.attributes.new(name, kind, 'POINT')
        if count:
            attribute.data.foreach_set(key, arrays[name].ravel())


def _camera(obj, scene, depsgraph):
    """(viewmat, K) of the scene camera at the render size for ``obj``'s body frame, or None without
    a perspective scene camera (then the Gaussians are not widened)."""
    from .layers import render_size

    camera = depsgraph.scene_eval.camera or scene.camera
    if camera is None or camera.type != 'CAMERA' or camera.data.type != 'PERSP':
        return None
    viewmat, K = runtime.camera_matrices(obj, depsgraph, camera, *render_size(scene))
    return runtime.quantize(viewmat), runtime.quantize(K)


def _inputs(obj, scene, depsgraph):
    """(pose, transl, camera or None) of ``obj`` as evaluated in ``depsgraph``, quantised."""
    pose, transl = runtime.read_pose(obj, depsgraph, runtime.get_layout(runtime.get_avatar(obj).body))
    return runtime.quantize(pose), runtime.quantize(transl), _camera(obj, scene, depsgraph)


def _splats(obj, pose, transl, camera):
    """The Gaussians the splat object holds for that pose: posed through the avatar's fast path (as
    the compositing layer's renders and the viewport: runtime.fast_gaussians), widened for the
    camera, in the armature's frame (native_splats.splat_gaussians)."""
    import torch

    from ..hda_backend import rig
    from ..hda_backend.native_splats import camera_dilation, splat_gaussians

    with torch.inference_mode():
        g = runtime.fast_gaussians(obj, pose, transl)
        dilation = None if camera is None else camera_dilation(g.means, *camera)
        return splat_gaussians(g, rig.body_to_world(np.eye(4)), f"avatar '{obj.name}'", dilation)


def frame_splats(obj, scene, depsgraph):
    """The avatar's splats (Gaussians, armature frame) for its pose in ``depsgraph``: what a farm bake
    writes (native_bake.py). Raises HDAError for bad input."""
    return _splats(obj, *_inputs(obj, scene, depsgraph))


def write(obj, scene, depsgraph) -> bool:
    """Write the avatar's Gaussians for its pose in ``depsgraph`` into its splat object.
    Returns False when the splats already held that pose. Raises HDAError for bad input."""
    from ..hda_backend.native_splats import splat_arrays

    splats = splat_object(obj)
    key = object_key(obj)
    pose, transl, camera = _inputs(obj, scene, depsgraph)
    stamp = (session.caches.avatars[key][0], pose.tobytes() + transl.tobytes(),
             None if camera is None else camera[0].tobytes() + camera[1].tobytes())
    if session.native.written.get(key) == stamp:
        return False
    session.native.written.pop(key, None)
    g = _splats(obj, pose, transl, camera)
    arrays = splat_arrays(g, source=f"avatar '{obj.name}'")
    _fill(splats.data, arrays, g.means.shape[0])
    splats.update_tag(refresh={'DATA'})
    session.native.written[key] = stamp
    return True


def bake(obj, scene, depsgraph, frame: int) -> str:
    """Bake the native avatar's splats of ``frame`` (its pose in ``depsgraph``) for farms and give its
    splat object the modifier that reads them without the add-on (native_bake.py). Returns the file.
    Raises HDAError for bad input."""
    native_bake.ensure_modifier(obj, splat_object(obj))
    return native_bake.write_frame(obj, scene, depsgraph, frame, frame_splats(obj, scene, depsgraph))


def update(scene, depsgraph, avatars=None) -> list[str]:
    """Write the splats of the enabled native avatars (default: all of ``scene``'s). A failing avatar
    (a bad avatar file, no backend) shows its baked splats of this frame where they are current (its
    farm modifier goes on, native_bake.py), else its splats are emptied; its error is kept and
    returned, one line per avatar."""
    failures = []
    for obj in native_avatars(scene) if avatars is None else avatars:
        if not obj.hda.enabled:
            continue
        try:
            write(obj, scene, depsgraph)
            native_bake.use_baked(obj, False)
            session.caches.errors.pop(object_key(obj), None)
        except Exception as exc:  # noqa: BLE001 - one avatar failing must not stop the others or the render
            message = error_text(exc)
            session.caches.errors[object_key(obj)] = message
            session.native.written.pop(object_key(obj), None)
            if native_bake.baked_is_current(obj, scene, depsgraph, scene.frame_current):
                native_bake.use_baked(obj, True)
                failures.append(f"{obj.name}: {message}; its baked splats are current and are used")
                continue
            native_bake.use_baked(obj, False)
            failures.append(f"{obj.name}: {message}")
            splats = obj.hda.splats
            if splats is not None:
                _fill(splats.data, {}, 0)
                splats.update_tag(refresh={'DATA'})
    return failures


def sync(scene) -> None:
    """Give every native avatar of ``scene`` its splat object (shown as the avatar is enabled) and take
    it from avatars back on the compositing layer."""
    for obj in scene.objects:
        if obj.type != 'ARMATURE' or not obj.hda.is_avatar:
            continue
        if obj.hda.native:
            splats = splat_object(obj)
            splats.hide_render = splats.hide_viewport = not obj.hda.enabled
        elif obj.hda.splats is not None:
            remove_splats(obj)


def _report(scene, failures) -> None:
    for line in failures:
        print(f"HDA Avatars: frame {scene.frame_current}: {line}", file=sys.stderr)


@persistent
def on_frame_change(scene, depsgraph=None):
    if depsgraph is not None:
        _report(scene, update(scene, depsgraph))


@persistent
def on_depsgraph_update(scene, depsgraph):
    if session.render.rendering:
        return
    avatars = native_avatars(scene)
    if not avatars:
        return
    changed = {u.id.name for u in depsgraph.updates if isinstance(u.id, bpy.types.Object)}
    camera = scene.camera
    moved = avatars if camera is not None and camera.name in changed else [o for o in avatars if o.name in changed]
    if moved:
        _report(scene, update(scene, depsgraph, moved))


@persistent
def on_load_post(*_):
    """File > Open, undo, redo: the splat data may no longer be what session.native remembers writing;
    forget it, so the next frame or depsgraph update (undo re-evaluates the armatures) rewrites them.
    The add-on drives the splats: the farm modifiers (on in saved files) go off."""
    session.native.reset()
    native_bake.set_farm_modifiers(False)


@persistent
def on_save_pre(*_):
    """The saved file renders the baked splat frames where the add-on is missing (native_bake.py)."""
    native_bake.set_farm_modifiers(True)


@persistent
def on_save_post(*_):
    native_bake.set_farm_modifiers(False)


HANDLERS = (
    ("save_pre", on_save_pre),
    ("save_post", on_save_post),
    ("save_post_fail", on_save_post),  # a failed save must not leave the baked frames over the live splats
    ("frame_change_post", on_frame_change),
    ("depsgraph_update_post", on_depsgraph_update),
    ("load_post", on_load_post),
    ("undo_post", on_load_post),
    ("redo_post", on_load_post),
)


def _farm_modifiers(on: bool) -> None:
    try:
        native_bake.set_farm_modifiers(on)
    except AttributeError:  # bpy.data is restricted (Blender starting up): load_post switches them
        pass


def register() -> None:
    for name, func in HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if func not in handlers:
            handlers.append(func)
    _farm_modifiers(False)  # the add-on drives the splats from now on


def unregister() -> None:
    for name, func in HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        while func in handlers:
            handlers.remove(func)
    _farm_modifiers(True)  # without the add-on the baked frames are the splats, in the session and when saved
