"""The native path's farm bake (Blender ≥ 5.3): per-frame splat files that Blender alone, without this
add-on or torch, loads into a native avatar's splat object at render time.

A native avatar's splats are written live by the add-on (native.py); a farm without it would render
the pose saved in the file at every frame. *Bake* (operators/bake.py, native.bake) writes, for each frame, the
splats native.py would write (native.frame_splats: posed, widened for the scene camera, in the
armature's frame) as a 3DGS PLY file, with the frame's bake key (hda_backend/bake_key.py, as for the
compositing layers) in a ``comment hdaBakeKey`` header line, so a file and its key are written, moved
and deleted together. Files live in ``//hda_splats/<.blend name>/<avatar uid>/frame_NNNN.ply``, one
folder per saved file and avatar as the layers' (layers.layer_dir), written atomically.

Why PLY files read by geometry nodes rather than a baked geometry cache: Blender 5.3's *Import PLY*
node loads such a file as a ``GAUSSIAN_SPLAT`` point cloud with every attribute the renderer reads
(the same import as File > Import), its path can be built per frame from *Scene Time* in the node
tree, it resolves '//'-relative paths against the .blend, and the files are the ones ``hda
export-ply`` writes for other viewers; a *Bake* node cache would need Blender (not the backend) to
write it, frame by frame, from splats it already holds.

The splat object carries a geometry-nodes modifier (:data:`MODIFIER`) that replaces its points with
the frame's file. It is switched on in the saved file (save_pre) and when the add-on is disabled,
and off while this add-on drives the splats live (register, save_post, load_post; native.py): with
the add-on the live rewrite is the truth at every frame, including poses not baked yet. Without it,
the saved file renders the baked frames. A frame whose file is missing or unreadable (Import PLY
then yields no points and prints "PLY Importer: ... Invalid PLY header") renders the splats saved in
the file in opaque pink-magenta instead (:data:`MISSING_RADIANCE`, as the compositing path paints a
missing layer magenta), never a person-less frame. Stale files (pose, identity, camera or settings
changed since the bake) are reported by *Check for Farm* and ``hda check-blend`` (farm.py). With the
add-on but no working backend, an avatar whose live write fails shows its current baked frame
(:func:`baked_is_current`, native.update), as the compositing path uses a current baked layer.
"""

from __future__ import annotations

import os

import bpy

from ..hda_backend import bake_key
from ..hda_backend.errors import HDAError
from ..hda_backend.ply_comments import read_comments
from . import bake_inputs, layers

SPLAT_DIR = "//hda_splats"
MODIFIER = "HDA Farm Splats"      # the modifier and its node group
PREFIX_INPUT = "Frames"           # the group's string input: the frame files' path up to the number
PADDING = 4                        # digits of the frame number in the file names
MISSING = "no splat file: bake it"  # Check for Farm's reason for a frame without its file (bake_key.MISSING's twin)
# The SH coefficient 0 of r, g, b and the opacity of a splat whose frame file is missing: colour =
# C0·sh0 + 0.5 (gsplat's C0, hda_backend/render/_projection.py) = (1, 0.5, 1), opaque. Geometry nodes
# store a 4-float value only as a colour attribute (their FLOAT4 value socket has 3 components and
# stores opacity 0), and Cycles renders a negative coefficient of a colour attribute as 0 (measured
# with bpy 5.3.0), so this pink is the nearest to the compositing path's magenta (compositor.py).
_SH_C0 = 0.2820947917738781
MISSING_RADIANCE = (0.5 / _SH_C0, 0.0, 0.5 / _SH_C0, 1.0)


def _frame_name(frame: int) -> str:
    return f"frame_{frame:0{PADDING}d}.ply"


def frame_path(obj, frame: int, blend_path: str | None = None) -> str:
    """Absolute path of the native avatar's baked splat file for ``frame``."""
    return os.path.join(layers.layer_dir(blend_path, SPLAT_DIR), obj.hda.uid or obj.name, _frame_name(frame))


def stored_prefix(obj) -> str:
    """The path the modifier joins with the padded frame number and '.ply': '//'-relative once the
    .blend is saved."""
    folder = obj.hda.uid or obj.name
    if bpy.data.filepath:
        return "//" + "/".join((SPLAT_DIR[2:], layers.file_folder(), folder, "frame_"))
    return os.path.join(layers.layer_dir(None, SPLAT_DIR), folder, "frame_")


def _node_group():
    """The shared node group: the file of the scene's frame, or the input in magenta when it has no
    points (a missing or unreadable file)."""
    tree = bpy.data.node_groups.get(MODIFIER)
    if tree is not None and tree.bl_idname == 'GeometryNodeTree':
        return tree
    tree = bpy.data.node_groups.new(MODIFIER, 'GeometryNodeTree')
    tree.interface.new_socket("Geometry", in_out='INPUT', socket_type='NodeSocketGeometry')
    tree.interface.new_socket(PREFIX_INPUT, in_out='INPUT', socket_type='NodeSocketString')
    tree.interface.new_socket("Geometry", in_out='OUTPUT', socket_type='NodeSocketGeometry')
    nodes, link = tree.nodes, tree.links.new
    group_in, group_out = nodes.new('NodeGroupInput'), nodes.new('NodeGroupOutput')
    time = nodes.new('GeometryNodeInputSceneTime')
    number = nodes.new('FunctionNodeValueToString')
    number.data_type = 'INT'
    number.inputs["Padding"].default_value = PADDING
    suffix = nodes.new('FunctionNodeInputString')
    suffix.string = ".ply"
    join = nodes.new('GeometryNodeStringJoin')
    load = nodes.new('GeometryNodeImportPLY')
    count = nodes.new('GeometryNodeAttributeDomainSize')
    count.component = 'POINTCLOUD'
    magenta = nodes.new('GeometryNodeStoreNamedAttribute')
    magenta.data_type, magenta.domain = 'FLOAT_COLOR', 'POINT'
    magenta.inputs["Name"].default_value = "radiance:base"
    magenta.inputs["Value"].default_value = MISSING_RADIANCE
    plain = nodes.new('GeometryNodeRemoveAttribute')  # no view-dependent colour on the magenta
    plain.inputs["Pattern Mode"].default_value = 'Wildcard'
    plain.inputs["Name"].default_value = "radiance:sh_*"
    switch = nodes.new('GeometryNodeSwitch')
    switch.input_type = 'GEOMETRY'
    link(time.outputs["Frame"], number.inputs["Value"])
    # Join Strings lists its inputs in reverse link order: link the last part first.
    link(suffix.outputs[0], join.inputs["Strings"])
    link(number.outputs[0], join.inputs["Strings"])
    link(group_in.outputs[PREFIX_INPUT], join.inputs["Strings"])
    link(join.outputs[0], load.inputs["Path"])
    link(load.outputs[0], count.inputs[0])
    link(group_in.outputs["Geometry"], magenta.inputs["Geometry"])
    link(magenta.outputs[0], plain.inputs["Geometry"])
    link(count.outputs["Point Count"], switch.inputs["Switch"])  # no points: False
    link(plain.outputs[0], switch.inputs["False"])
    link(load.outputs[0], switch.inputs["True"])
    link(switch.outputs[0], group_out.inputs[0])
    return tree


def _prefix_input(mod):
    """The modifier's value of the group's :data:`PREFIX_INPUT` (Blender 5.3 keeps a modifier's input
    values in ``properties.inputs``, one struct with a ``value`` per socket identifier)."""
    key = next(item.identifier for item in mod.node_group.interface.items_tree
               if item.item_type == 'SOCKET' and item.in_out == 'INPUT' and item.name == PREFIX_INPUT)
    return getattr(mod.properties.inputs, key)


def modifier_prefix(obj) -> str | None:
    """The path prefix the avatar's splat object reads its baked frames from, or None without the
    modifier."""
    splats = obj.hda.splats
    mod = splats.modifiers.get(MODIFIER) if splats is not None else None
    if mod is None or mod.type != 'NODES' or mod.node_group is None:
        return None
    return _prefix_input(mod).value


def ensure_modifier(obj, splats) -> None:
    """Give the avatar's splat object ``splats`` the modifier reading this file's baked frames (off:
    the add-on drives the splats live; the saved file has it on)."""
    mod = splats.modifiers.get(MODIFIER)
    if mod is None or mod.type != 'NODES':
        mod = splats.modifiers.new(MODIFIER, 'NODES')
    mod.show_render = mod.show_viewport = False
    mod.node_group = _node_group()
    _prefix_input(mod).value = stored_prefix(obj)


def write_frame(obj, scene, depsgraph, frame: int, g) -> str:
    """Write the native avatar's splats ``g`` (Gaussians in the armature's frame, native.frame_splats)
    for ``frame`` with the bake key of its pose in ``depsgraph``. Raises HDAError for bad input (no
    scene camera: the splats are widened for it)."""
    from ..hda_backend.export_ply import write_ply  # torch: not at register()

    w, h = layers.render_size(scene)
    camera = depsgraph.scene_eval.camera or scene.camera
    key = bake_key.encode(bake_inputs.identity(obj, w, h), bake_inputs.frame_inputs(obj, depsgraph, camera, w, h))
    return str(write_ply(frame_path(obj, frame), g, {bake_key.ATTRIBUTE: key}))


def stored_key(obj, frame: int) -> str | None:
    """The bake key of the avatar's splat file for ``frame`` (None: the file has none). Raises
    HDAError when the file is missing or not a PLY file."""
    path = frame_path(obj, frame)
    if not os.path.isfile(path):
        raise HDAError(MISSING)
    return read_comments(path).get(bake_key.ATTRIBUTE)


def baked_is_current(obj, scene, depsgraph, frame: int) -> bool:
    """Whether the avatar's splat file of ``frame`` exists and its bake key matches the avatar as
    evaluated in ``depsgraph`` (so it can stand in when the backend cannot write the splats: a farm
    with the add-on but without torch), and the modifier reads it."""
    w, h = layers.render_size(scene)
    try:
        stored = stored_key(obj, frame)
        camera = depsgraph.scene_eval.camera or scene.camera
        inputs = bake_inputs.frame_inputs(obj, depsgraph, camera, w, h)
        current = bake_key.stale_reason(stored, bake_inputs.identity(obj, w, h), inputs) is None
    except HDAError:
        return False
    return current and modifier_problem(obj) is None


def use_baked(obj, on: bool) -> None:
    """Switch the avatar's farm modifier: on, its splats are the baked file of each frame."""
    splats = obj.hda.splats
    mod = splats.modifiers.get(MODIFIER) if splats is not None else None
    if mod is not None and mod.show_render != on:
        mod.show_render = mod.show_viewport = on


def modifier_problem(obj, saved: bool = False) -> str | None:
    """Why the saved file would not load this avatar's baked frames from this file's folder, or None.
    saved: the file is checked as saved (``hda check-blend``), where the modifier must be on; in a
    session with the add-on it is off until the file is saved."""
    prefix = modifier_prefix(obj)
    if prefix is None:
        return f"{obj.name}: its splats do not read baked frames (a native avatar): bake it with the add-on enabled"
    if prefix != stored_prefix(obj):
        return f"{obj.name}: its splats read {prefix}NNNN.ply, expected {stored_prefix(obj)}NNNN.ply: bake it again"
    if saved and not obj.hda.splats.modifiers[MODIFIER].show_render:
        return (f"{obj.name}: its '{MODIFIER}' modifier is off in the saved file, so a farm renders the pose "
                f"saved in it: save the file with the add-on enabled")
    return None


def set_farm_modifiers(on: bool) -> None:
    """Switch every farm modifier on (the file as saved) or off (the add-on drives the splats)."""
    for obj in bpy.data.objects:
        mod = obj.modifiers.get(MODIFIER) if obj.type == 'POINTCLOUD' else None
        if mod is not None and mod.show_render != on:
            mod.show_render = mod.show_viewport = on
