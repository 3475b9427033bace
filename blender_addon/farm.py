"""*Check for Farm*: will the saved file render every avatar on a machine without this add-on?

For each enabled avatar of the scene and each frame ``blender -b file.blend -a`` renders (the frame
range and step), the avatar's baked file must exist and its bake key (hda_backend/bake_key.py) must
match what the avatar would show now: same identity and settings, same pose, same placement, same
camera. For an avatar on the compositing layer that file is its layer EXR (key in the header), and
the saved compositor must read it from this file's own layer folder; for a native avatar (Blender ≥
5.3) it is its splat PLY (key in a header comment, native_bake.py), and its splat object's modifier
must read it from this file's own folder. Each problem is one line naming the avatar, the frames and
what changed. Used by the ``hda.check_farm`` operator (sidebar) and by ``hda check-blend
FILE.blend`` (farm_cli.py).

The check steps the scene through its frames (``frame_set``) and puts the current frame back.
"""

from __future__ import annotations

import os

import bpy

from ..hda_backend import bake_key
from ..hda_backend.errors import HDAError
from ..hda_backend.exr import read_strings
from . import bake_inputs, compositor, layers, native_bake, runtime, session
from .messages import error_text
from .objects import duplicate_uids, native_avatars, object_key, scene_avatars


def _compositor_problem(obj, scene) -> str | None:
    """Why the saved compositor would not merge this avatar's layer from this file's folder, or None."""
    if not scene.render.use_compositing:
        return f"{obj.name}: compositing is off (Output Properties > Post Processing): its layer is never merged"
    tree = scene.compositing_node_group if compositor.NEW_API else (scene.node_tree if scene.use_nodes else None)
    node = tree.nodes.get(f"{compositor.PREFIX}Layer {obj.name}") if tree is not None else None
    if node is None or node.image is None:
        return f"{obj.name}: the compositor does not merge its layer: bake it with the add-on enabled"
    expected = layers.stored_path(obj, scene.frame_start)
    if node.image.filepath != expected:
        return f"{obj.name}: the compositor reads {node.image.filepath}, expected {expected}: bake it again"
    return None


def farm_avatars(scene) -> list:
    """The avatars a farm render of ``scene`` shows: enabled, on either path, by name."""
    return sorted(scene_avatars(scene) + [o for o in native_avatars(scene) if o.hda.enabled], key=lambda o: o.name)


def _stored_key(obj, frame: int) -> str | None:
    """The bake key of the avatar's baked file of ``frame``; HDAError(MISSING) without one."""
    if obj.hda.native:
        return native_bake.stored_key(obj, frame)
    path = layers.frame_path(obj, frame)
    if not os.path.isfile(path):
        raise HDAError(bake_key.MISSING)
    return read_strings(path).get(bake_key.ATTRIBUTE)


def check_scene(scene, load_avatars: bool = True, saved: bool = False) -> list[str]:
    """One line per problem that would make a farm render of ``scene`` wrong (empty: ready).

    load_avatars: also load each avatar (needs the backend), as a render with the add-on would:
    a bad avatar file is reported even while its baked layers are still fresh.
    saved: ``scene`` is as its file was saved, not driven by the add-on (``hda check-blend``).
    """
    avatars = farm_avatars(scene)
    lines = [f"{copy.name}: shares its uid with {original.name} (a duplicate), so both use one set of layer "
             f"files: save the file with the add-on enabled to give it its own, then bake"
             for copy, original in duplicate_uids(bpy.data.objects) if copy in avatars]
    if not bpy.data.filepath:
        lines.append("the file is not saved: its layers are in a temporary folder a farm cannot see")
    width, height = layers.render_size(scene)
    identities = {}
    for obj in avatars:
        problem = native_bake.modifier_problem(obj, saved) if obj.hda.native else _compositor_problem(obj, scene)
        if problem:
            lines.append(problem)
        try:
            identities[obj.name] = bake_inputs.identity(obj, width, height)
            if load_avatars:
                runtime.get_avatar(obj)
        except (HDAError, ImportError) as exc:
            message = error_text(exc)
            session.caches.errors[object_key(obj)] = message  # the sidebar's status line shows it too
            lines.append(f"{obj.name}: {message}")
    reasons = {name: {} for name in identities}
    frames = range(scene.frame_start, scene.frame_end + 1, max(1, scene.frame_step))
    current = scene.frame_current
    try:
        for frame in frames:
            scene.frame_set(frame)
            depsgraph = bpy.context.evaluated_depsgraph_get()
            camera = depsgraph.scene_eval.camera or scene.camera
            for obj in avatars:
                if obj.name not in identities:
                    continue
                try:
                    stored = _stored_key(obj, frame)
                    inputs = bake_inputs.frame_inputs(obj, depsgraph, camera, width, height)
                except HDAError as exc:
                    reasons[obj.name][frame] = str(exc)
                    continue
                reasons[obj.name][frame] = bake_key.stale_reason(stored, identities[obj.name], inputs)
    finally:
        scene.frame_set(current)
    for obj in avatars:
        if obj.name in reasons:
            lines += bake_key.summarize(obj.name, reasons[obj.name])
    return lines


def summary(scene, lines: list[str]) -> str:
    """One line for the sidebar and reports."""
    avatars = len(farm_avatars(scene))
    if not lines:
        return (f"Ready for the farm: {avatars} avatar(s), frames {scene.frame_start}-{scene.frame_end} baked "
                f"and current")
    return f"Not ready for the farm: {len(lines)} problem(s) (first: {lines[0]})"
