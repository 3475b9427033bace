"""The compositor setup that merges the avatars' layers over the render, stored in the .blend.

For each enabled avatar (in name order) the chain

    front = avatar depth < depth so far              (Math: Less Than)
    image = Alpha Over(image so far, avatar, factor=front)   (premultiplied avatar over the render)
    depth = min(depth so far, avatar depth)          (Math: Minimum, for the next avatar)

    missing = avatar depth < MISSING_DEPTH           (Math: Less Than)
    image = Alpha Over(image, magenta, factor=missing)

starts from the render (the image the user's tree sent to the output, else Render Layers' Image)
and the Render Layers' Depth pass, and ends at the compositor's output. Per pixel that is a depth
test with the avatar's own coverage as alpha: scene geometry nearer than the avatar hides it, and
where the avatar is nearer it is laid over with its soft edges (Z Combine mixes with straight
alpha, which would darken a premultiplied layer's edges). Only nodes named ``HDA ...`` are ours;
syncing rebuilds them and leaves the user's nodes alone.

A layer file that is missing reads as all zeros in Blender's Image node (measured on bpy 5.0: the
render goes on and reports FINISHED), which would silently render the frame without the person.
A real layer has depth > 0 everywhere (the avatar's camera depth, or 1e10 where it is absent), so
depth 0 means "no layer" (a missing file, or the placeholder of layers.write_placeholder): those
pixels turn magenta, Blender's own colour for missing data, so a farm render without its baked
layers cannot pass for a correct frame. With the add-on, the handlers fail such a render outright.

An engine whose render layer has no Depth output (or a disabled one) gets the avatar laid over the
render without the depth test (nothing can hide it), never an error.

The tree is plain data in the .blend, so ``blender -b file.blend -a`` on a machine without this
add-on composites the layer files (layers.py) exactly as an interactive render does. Blender 4.x
keeps the tree in ``scene.node_tree`` (``use_nodes``, a Composite node); 5.x in
``scene.compositing_node_group`` (a node group whose Group Output is the result).
"""

import os

import bpy

from . import layers
from .objects import ensure_unique_uids, scene_avatars

PREFIX = "HDA "
NEW_API = bpy.app.version >= (5, 0, 0)
MISSING_DEPTH = 1e-6                  # a layer's depth below this: no layer file for the frame
MISSING_COLOUR = (1.0, 0.0, 1.0, 1.0)


def _tree(scene):
    """(node tree, output node) of the scene's compositor, created when missing."""
    if NEW_API:
        tree = scene.compositing_node_group
        if tree is None:
            tree = bpy.data.node_groups.new("Compositing", "CompositorNodeTree")
            tree.interface.new_socket("Image", in_out='OUTPUT', socket_type='NodeSocketColor')
            scene.compositing_node_group = tree
        outputs = [n for n in tree.nodes if n.bl_idname == 'NodeGroupOutput']
        output = next((n for n in outputs if n.is_active_output), outputs[0] if outputs else None)
        if output is None:
            output = tree.nodes.new('NodeGroupOutput')
            output.location = (600, 0)
        if not output.inputs or output.inputs[0].type == 'CUSTOM':
            tree.interface.new_socket("Image", in_out='OUTPUT', socket_type='NodeSocketColor')
        return tree, output
    scene.use_nodes = True
    tree = scene.node_tree
    outputs = [n for n in tree.nodes if n.bl_idname == 'CompositorNodeComposite']
    output = outputs[0] if outputs else tree.nodes.new('CompositorNodeComposite')
    return tree, output


def _math(tree, name: str, operation: str, location):
    node = tree.nodes.new('ShaderNodeMath' if NEW_API else 'CompositorNodeMath')
    node.name = node.label = name
    node.operation = operation
    node.location = location
    return node


def _alpha_over(tree, name: str, location):
    node = tree.nodes.new('CompositorNodeAlphaOver')
    node.name = node.label = name
    node.location = location
    if NEW_API:
        return node, node.inputs['Background'], node.inputs['Foreground'], node.inputs['Factor']
    return node, node.inputs[1], node.inputs[2], node.inputs[0]


def _render_layers(tree, scene):
    for node in tree.nodes:
        if node.bl_idname == 'CompositorNodeRLayers' and node.scene in (None, scene):
            return node
    node = tree.nodes.new('CompositorNodeRLayers')
    node.name = node.label = PREFIX + "Render Layers"
    node.scene = scene
    node.location = (-400, 0)
    return node


def _upstream(tree, output, render_layers):
    """The image socket our chain starts from: what feeds our first Alpha Over, else what feeds the
    output, else the render."""
    for node in tree.nodes:
        if node.name.startswith(PREFIX + "Over"):
            background = node.inputs['Background'] if NEW_API else node.inputs[1]
            if background.links and not background.links[0].from_node.name.startswith(PREFIX):
                return background.links[0].from_socket
    target = output.inputs[0]
    if target.links and not target.links[0].from_node.name.startswith(PREFIX):
        return target.links[0].from_socket
    return render_layers.outputs['Image']


def layer_image(obj, scene, blend_path=None):
    """The avatar's layer image sequence (created on first use; its first frame written empty when
    missing, so the image has its Combined and Depth passes). ``blend_path``: where the .blend is
    being saved, when the image must point next to it before the save makes '//' resolve there."""
    first = layers.frame_path(obj, scene.frame_start, blend_path)
    if not os.path.isfile(first):
        layers.write_placeholder(obj, scene, scene.frame_start, blend_path)
    name = layers.image_name(obj)
    image = bpy.data.images.get(name)
    if image is None:
        image = bpy.data.images.load(first, check_existing=False)
        image.name = name
    stored = layers.stored_path(obj, scene.frame_start, blend_path)
    if image.filepath != stored:
        if blend_path is None:
            image.filepath = stored
        else:
            # Before a save the new '//' path does not resolve yet: setting ``filepath`` would reload
            # the image, fail, and turn the Image nodes' pass sockets (and their links) off in the
            # saved file. ``filepath_raw`` only stores the path; it is read once the file is saved.
            image.filepath_raw = stored
    if image.source != 'SEQUENCE':
        image.source = 'SEQUENCE'
    return image


def retarget(scene, blend_path: str) -> None:
    """Point the avatars' layer images next to where the .blend is being saved (save_pre). Nodes
    stay as they are: until the save completes the new '//' path does not resolve, and a node
    rebuilt now would not see its image's passes."""
    ensure_unique_uids(bpy.data.objects)
    for obj in scene_avatars(scene):
        layer_image(obj, scene, blend_path)


def sync(scene) -> None:
    """Make the scene's compositor merge every enabled avatar's layer (and only those) over the render."""
    ensure_unique_uids(bpy.data.objects)  # a Shift+D copy gets its own layer files before anything is written
    avatars = scene_avatars(scene)
    tree = scene.compositing_node_group if NEW_API else (scene.node_tree if scene.use_nodes else None)
    if not avatars and (tree is None or not any(n.name.startswith(PREFIX) for n in tree.nodes)):
        return  # nothing of ours to add or remove: leave the user's compositor untouched
    # Passes first: enabling one rebuilds the Render Layers nodes' sockets, and socket references
    # taken before would dangle.
    scene.render.use_lock_interface = True  # handlers write layers while Blender renders
    scene.render.use_compositing = True
    for view_layer in scene.view_layers:
        if not view_layer.use_pass_z:
            view_layer.use_pass_z = True
    tree, output = _tree(scene)
    render_layers = _render_layers(tree, scene)
    upstream = _upstream(tree, output, render_layers)
    upstream_node, upstream_socket = upstream.node.name, upstream.identifier
    for node in [n for n in tree.nodes if n.name.startswith(PREFIX) and n.name != render_layers.name]:
        tree.nodes.remove(node)
    image = next(s for s in tree.nodes[upstream_node].outputs if s.identifier == upstream_socket)
    depth = render_layers.outputs.get('Depth')
    if depth is not None and not depth.enabled:
        depth = None
    x, y = render_layers.location.x + 300, render_layers.location.y - 300
    for i, obj in enumerate(avatars):
        node = tree.nodes.new('CompositorNodeImage')
        node.name = node.label = f"{PREFIX}Layer {obj.name}"
        sequence = layer_image(obj, scene)
        sequence.reload()  # a load that failed earlier (a path retargeted before a save) is not retried
        node.image = sequence
        node.frame_start = scene.frame_start
        node.frame_offset = scene.frame_start - 1   # file number = scene frame
        node.frame_duration = max(1, scene.frame_end - scene.frame_start + 1)
        node.use_auto_refresh = True
        node.location = (x + 400 * i, y)
        over, background, foreground, factor = _alpha_over(tree, f"{PREFIX}Over {obj.name}", (x + 400 * i + 200, y + 400))
        tree.links.new(image, background)
        tree.links.new(node.outputs['Combined'], foreground)
        if depth is not None:
            front = _math(tree, f"{PREFIX}Front {obj.name}", 'LESS_THAN', (x + 400 * i + 200, y + 150))
            tree.links.new(node.outputs['Depth'], front.inputs[0])
            tree.links.new(depth, front.inputs[1])
            tree.links.new(front.outputs[0], factor)
            nearest = _math(tree, f"{PREFIX}Depth {obj.name}", 'MINIMUM', (x + 400 * i + 200, y - 50))
            tree.links.new(node.outputs['Depth'], nearest.inputs[0])
            tree.links.new(depth, nearest.inputs[1])
            depth = nearest.outputs[0]
        else:
            factor.default_value = 1.0
        missing = _math(tree, f"{PREFIX}Missing {obj.name}", 'LESS_THAN', (x + 400 * i + 200, y + 650))
        tree.links.new(node.outputs['Depth'], missing.inputs[0])
        missing.inputs[1].default_value = MISSING_DEPTH
        flag, background, foreground, factor = _alpha_over(tree, f"{PREFIX}Flag {obj.name}",
                                                           (x + 400 * i + 350, y + 650))
        tree.links.new(over.outputs[0], background)
        foreground.default_value = MISSING_COLOUR
        tree.links.new(missing.outputs[0], factor)
        image = flag.outputs[0]
    tree.links.new(image, output.inputs[0])
    if render_layers.name.startswith(PREFIX) and not render_layers.outputs['Image'].links and not avatars:
        tree.nodes.remove(render_layers)
