"""Drives real Blender (bpy) for tests/test_blender_farm.py; run as a script in a child process.

    python blender_farm_driver.py ARGS.json

Phases (ARGS["phase"]); each writes OUT/report.json (plain values) and OUT/arrays.npz:

- stale:  install the zip, key an avatar, save A.blend, bake, and check for the farm after each
          change of the stale-bake matrix (camera moved and moved back, pose changed, identity
          changed, resolution changed, Save As B.blend, Shift+D); saves B.blend with a moved camera.
- farm:   open a .blend *without* the add-on and render it (a layer frame deleted by the test).
- render: open A.blend with the add-on; render under Workbench and an engine without a depth pass
          (every handler must survive), the AgX case (the person against an emission plane of the
          same linear radiance), then a render with a corrupt avatar file, which must fail: the
          process exits with status 1 (the report is written before it).
"""

import json
import os
import sys

import numpy as np

args = json.load(open(sys.argv[1]))
import bpy  # noqa: E402

ADDON = args["addon"]
OUT = args["out"]
report = {"version": list(bpy.app.version)}
BAD_RENDER = "HDA-TEST: the render with a bad avatar file starts"
arrays = {}


def write_report():
    with open(os.path.join(OUT, "report.json"), "w") as fh:
        json.dump(report, fh)
    np.savez(os.path.join(OUT, "arrays.npz"), **arrays)


def enable(zip_path=None):
    if zip_path:
        bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    else:
        bpy.ops.preferences.addon_enable(module=ADDON)
    if args.get("python_path"):
        bpy.context.preferences.addons[ADDON].preferences.python_path = args["python_path"]


def module(name):
    return sys.modules[f"{ADDON}.{name}"]


def check():
    """The Check for Farm operator's problems (and its summary)."""
    assert bpy.ops.hda.check_farm() == {'FINISHED'}
    farm = module("blender_addon.session").farm
    return list(farm.lines)


def read_image(path, raw=False):
    img = bpy.data.images.load(path, check_existing=False)
    if raw:
        img.colorspace_settings.name = 'Non-Color'  # the file's display values, not linearised
    w, h = img.size
    px = np.empty(w * h * 4, np.float32)
    img.pixels.foreach_get(px)
    bpy.data.images.remove(img)
    return px.reshape(h, w, 4)[::-1].copy()  # top row first


def render_still(tag, fmt='OPEN_EXR', depth='32'):
    scene = bpy.context.scene
    scene.render.image_settings.file_format = fmt
    scene.render.image_settings.color_depth = depth
    path = os.path.join(OUT, tag + (".exr" if fmt == 'OPEN_EXR' else ".png"))
    scene.render.filepath = path
    bpy.ops.render.render(write_still=True)
    return read_image(path, raw=fmt != 'OPEN_EXR')


def layer_files(blend, uid):
    folder = os.path.join(os.path.dirname(blend), "hda_layers", os.path.basename(blend)[:-6], uid)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def file_bytes(blend, uid):
    folder = os.path.join(os.path.dirname(blend), "hda_layers", os.path.basename(blend)[:-6], uid)
    return {n: open(os.path.join(folder, n), "rb").read() for n in layer_files(blend, uid)}


def setup_scene():
    scene = bpy.context.scene
    for obj in list(bpy.data.objects):
        if obj.type == 'MESH':
            bpy.data.objects.remove(obj)
    cam = scene.camera
    cam.location = args["camera"]["location"]
    cam.rotation_euler = args["camera"]["rotation"]
    cam.data.lens = args["camera"]["lens"]
    r = scene.render
    r.engine = 'CYCLES'
    scene.cycles.samples = 1
    scene.cycles.use_denoising = False
    scene.cycles.device = 'CPU'
    r.resolution_x, r.resolution_y = args["resolution"]
    r.resolution_percentage = args["percentage"]
    scene.frame_start, scene.frame_end = 1, 3
    return scene


def add_keyed_avatar():
    bpy.ops.hda.add_avatar(seed=3)
    arm = bpy.context.active_object
    arm.hda.uv_preset = 'tiny'
    for frame, angle in ((1, 0.0), (3, 0.8)):
        knee = arm.pose.bones["left_knee"]
        knee.rotation_quaternion = (np.cos(angle / 2), np.sin(angle / 2), 0.0, 0.0)
        knee.keyframe_insert("rotation_quaternion", frame=frame)
    return arm


def phase_stale():
    enable(args["zip"])
    scene = setup_scene()
    arm = add_keyed_avatar()
    a_blend, b_blend = args["a_blend"], args["b_blend"]
    bpy.ops.wm.save_as_mainfile(filepath=a_blend)
    report["unbaked"] = check()
    assert bpy.ops.hda.bake_layer() == {'FINISHED'}
    report["uid"] = uid = arm.hda.uid
    report["a_files"] = layer_files(a_blend, uid)
    report["baked"] = check()
    a_bytes = file_bytes(a_blend, uid)
    # Bake returns once its files are final: ZIP-compressed, smaller than the raw blocks the frame handler
    # writes first (hda_backend/layer_writer.py): 4 half + 1 float channels per pixel, plus the header.
    w, h = module("blender_addon.layers").render_size(scene)
    report["a_compressed"] = [len(b) < w * h * (4 * 2 + 4) for b in a_bytes.values()]

    cam = scene.camera
    x = cam.location.x
    cam.location.x = x + 0.2
    report["camera_moved"] = check()
    cam.location.x = x
    report["camera_back"] = check()

    knee = arm.pose.bones["left_knee"]
    scene.frame_set(3)
    knee.rotation_quaternion = (np.cos(0.5), np.sin(0.5), 0.0, 0.0)
    knee.keyframe_insert("rotation_quaternion", frame=3)
    report["pose_changed"] = check()
    knee.rotation_quaternion = (np.cos(0.4), np.sin(0.4), 0.0, 0.0)
    knee.keyframe_insert("rotation_quaternion", frame=3)
    report["pose_back"] = check()

    arm.hda.seed = 4
    report["identity_changed"] = check()
    arm.hda.seed = 3
    scene.render.resolution_percentage = args["percentage"] + 10
    report["resolution_changed"] = check()
    scene.render.resolution_percentage = args["percentage"]
    report["restored"] = check()

    bpy.ops.wm.save_as_mainfile(filepath=b_blend)
    report["save_as"] = check()
    image = bpy.data.images[module("blender_addon.layers").image_name(arm)]
    report["b_image"] = image.filepath
    assert bpy.ops.hda.bake_layer() == {'FINISHED'}
    report["b_baked"] = check()
    report["a_untouched"] = file_bytes(a_blend, uid) == a_bytes

    # File > Save Copy into another folder: the open file stays B, with B's paths and layers.
    copy_blend = os.path.join(os.path.dirname(b_blend), "copies", "C.blend")
    os.makedirs(os.path.dirname(copy_blend), exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=copy_blend, copy=True)
    report["save_copy"] = [bpy.data.filepath == b_blend, image.filepath, check()]

    # Shift+D on the avatar and its proxy.
    for other in bpy.context.view_layer.objects.selected:
        other.select_set(False)
    arm.select_set(True)
    arm.hda.proxy.select_set(True)
    bpy.context.view_layer.objects.active = arm
    bpy.ops.object.duplicate()
    copy = next(o for o in bpy.context.selected_objects if o.type == 'ARMATURE')
    copy.location.x += 0.6
    report["copy"] = [copy.name, copy.hda.uid]
    report["duplicated"] = check()
    assert bpy.ops.hda.bake_layer() == {'FINISHED'}   # syncs the compositor: the copy gets its own uid
    report["copy_uid"] = copy.hda.uid
    report["copy_files"] = layer_files(b_blend, copy.hda.uid)
    report["duplicate_baked"] = check()
    report["b_original_files"] = layer_files(b_blend, uid)

    cam.location.x = x + 0.2
    bpy.ops.wm.save_as_mainfile(filepath=b_blend)  # B is now stale: its camera moved after the bake


def phase_farm():
    bpy.ops.wm.open_mainfile(filepath=args["blend"])
    report["addon_loaded"] = any(m.startswith(ADDON) for m in sys.modules)
    scene = bpy.context.scene
    scene.render.image_settings.file_format = 'OPEN_EXR'
    scene.render.image_settings.color_depth = '32'
    scene.render.filepath = os.path.join(OUT, "farm_")
    report["result"] = sorted(bpy.ops.render.render(animation=True))
    for frame in (1, 2, 3):
        arrays[f"farm_{frame}"] = read_image(os.path.join(OUT, f"farm_{frame:04d}.exr"))


class NoDepthEngine(bpy.types.RenderEngine):
    """A render engine whose render layer has no Depth pass: a flat grey Combined pass."""

    bl_idname = "HDA_TEST_NO_DEPTH"
    bl_label = "No Depth"
    bl_use_postprocess = True

    def render(self, depsgraph):
        r = depsgraph.scene.render
        w, h = r.resolution_x * r.resolution_percentage // 100, r.resolution_y * r.resolution_percentage // 100
        result = self.begin_result(0, 0, w, h)
        result.layers[0].passes["Combined"].rect = [[0.2, 0.2, 0.2, 1.0]] * (w * h)
        self.end_result(result)


def avatar_visible(scene, arm, tag):
    """(pixels changed by the avatar, max change): a still with the avatar enabled and disabled."""
    with_avatar = render_still(tag + "_on")
    arm.hda.enabled = False
    without = render_still(tag + "_off")
    arm.hda.enabled = True
    diff = np.abs(with_avatar[..., :3] - without[..., :3]).max(-1)
    return int((diff > 1e-3).sum())


def phase_render():
    enable()
    bpy.ops.wm.open_mainfile(filepath=args["a_blend"])
    scene = bpy.context.scene
    arm = next(o for o in scene.objects if o.type == 'ARMATURE')
    scene.frame_set(1)
    tree = scene.compositing_node_group if bpy.app.version >= (5, 0, 0) else scene.node_tree

    scene.render.engine = 'BLENDER_WORKBENCH'
    report["workbench_pixels"] = avatar_visible(scene, arm, "workbench")
    report["workbench_nodes"] = sorted(n.name for n in tree.nodes if n.name.startswith("HDA "))

    bpy.utils.register_class(NoDepthEngine)
    scene.render.engine = NoDepthEngine.bl_idname
    report["nodepth_pixels"] = avatar_visible(scene, arm, "nodepth")
    report["nodepth_nodes"] = sorted(n.name for n in tree.nodes if n.name.startswith("HDA "))
    scene.render.engine = 'BLENDER_EEVEE' if bpy.app.version >= (5, 0, 0) else 'BLENDER_EEVEE_NEXT'
    handlers = module("blender_addon.handlers")
    handlers.on_render_init(scene)  # EEVEE does not render headless here; its compositor set-up must work
    report["eevee_nodes"] = sorted(n.name for n in tree.nodes if n.name.startswith("HDA "))

    # The backend cannot render (here: a CUDA device without CUDA) while the baked layer is current:
    # the baked layer is used, with a note, and the render goes on.
    scene.render.engine = 'CYCLES'
    arm.hda.device = 'cuda'
    report["fallback_pixels"] = avatar_visible(scene, arm, "fallback")
    arm.hda.device = 'cpu'

    # AgX: the person next to an emission plane whose radiance is one of the person's pixels.
    scene.render.dither_intensity = 0.0
    scene.world.color = (0.0, 0.0, 0.0)
    if scene.world.use_nodes:
        scene.world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.0
    linear = render_still("agx_linear")  # the composited frame, scene-linear: the person over black
    y, x = np.unravel_index(np.argmax(linear[..., :3].sum(-1)), linear.shape[:2])
    radiance = linear[y, x, :3].astype(float)
    bpy.ops.mesh.primitive_plane_add(size=0.5, location=args["plane"], rotation=(np.pi / 2, 0.0, 0.0))
    plane = bpy.context.active_object
    material = bpy.data.materials.new("Emission")
    material.use_nodes = True
    nodes = material.node_tree.nodes
    nodes.clear()
    emission = nodes.new('ShaderNodeEmission')
    emission.inputs["Color"].default_value = (*radiance, 1.0)
    emission.inputs["Strength"].default_value = 1.0
    out = nodes.new('ShaderNodeOutputMaterial')
    material.node_tree.links.new(emission.outputs[0], out.inputs["Surface"])
    plane.data.materials.append(material)
    from bpy_extras.object_utils import world_to_camera_view
    ndc = world_to_camera_view(scene, scene.camera, plane.location)
    w, h = module("blender_addon.layers").render_size(scene)
    px, py = int(ndc.x * w), int((1 - ndc.y) * h)
    report["agx"] = {"pixel": [int(y), int(x)], "plane_pixel": [py, px], "radiance": radiance.tolist()}
    for view in ("AgX", "Standard"):
        scene.view_settings.view_transform = view
        shown = render_still(f"agx_{view}", fmt='PNG', depth='16')
        report["agx"][view] = {"person": shown[y, x, :3].tolist(), "plane": shown[py, px, :3].tolist()}
    report["agx"]["linear_plane"] = render_still("agx_linear_plane")[py, px, :3].tolist()
    bpy.data.objects.remove(plane)
    scene.view_settings.view_transform = 'Standard'

    # A bad avatar file at render time: Check for Farm reports it, then the render fails.
    bad = os.path.join(OUT, "corrupt.hda.safetensors")
    with open(bad, "wb") as fh:
        fh.write(b"\x00garbage" * 10)
    arm.hda.avatar_path = bad
    report["bad_check"] = check()
    session = module("blender_addon.session")
    report["bad_status"] = dict(session.caches.errors)
    write_report()
    scene.render.image_settings.file_format = 'PNG'
    scene.render.filepath = os.path.join(OUT, "bad_")
    print(BAD_RENDER, file=sys.stderr, flush=True)
    bpy.ops.render.render(animation=True)
    report["bad_render_returned"] = True   # never reached: the handler fails the render


{"stale": phase_stale, "farm": phase_farm, "render": phase_render}[args["phase"]]()
write_report()
