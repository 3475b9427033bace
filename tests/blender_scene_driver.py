"""Drives real Blender (bpy) for tests/test_blender_scene.py; run as a script in a child process.

    python blender_scene_driver.py ARGS.json

ARGS names a phase and its inputs; the driver writes OUT/report.json (plain values) and
OUT/arrays.npz (pixels, matrices). Phases:

- main:   install the zip, undo an added avatar, add one, keyframe two SMPL-X poses, render
          (empty / avatar / again / occluded by a cube / the cube alone), check the camera and the
          rig against Blender's own evaluation, save, bake, two avatars, corrupt files, disable.
- reload: enable the installed add-on, open the saved file, render, undo a change, render.
- farm:   open the saved file *without* the add-on and render from the baked layers.
- key:    the key render test alone (used on Blender 4.2 with torch from an existing environment).
- native: Blender ≥ 5.3: the same avatar on the native path (a Gaussian-splat object rendered by Cycles).
- native_bake: Blender ≥ 5.3: a native avatar saved and baked for farms; Check for Farm before and
          after a pose change.
- native_farm: Blender ≥ 5.3: open that file *without* the add-on, render from the baked splats,
          evaluate a frame that has no baked file, then change a pose and save (for hda check-blend).
"""

import importlib
import json
import os
import sys

import numpy as np

args = json.load(open(sys.argv[1]))
import bpy  # noqa: E402

ADDON = args["addon"]
OUT = args["out"]
FRAMES = (1, 10)
report = {"version": list(bpy.app.version)}
arrays = {}


PROXY_FLAGS = ("hide_render", "visible_camera", "visible_diffuse", "visible_glossy", "visible_transmission",
               "visible_volume_scatter", "visible_shadow")


def handler_snapshot():
    return {n: [f"{getattr(f, '__module__', '')}.{getattr(f, '__name__', '')}" for f in getattr(bpy.app.handlers, n)]
            for n in dir(bpy.app.handlers) if isinstance(getattr(bpy.app.handlers, n), list)}


def call(op, **kw):
    try:
        return sorted(op(**kw)), None
    except RuntimeError as exc:  # an operator's ERROR report
        return None, str(exc)


def read_exr(path):
    img = bpy.data.images.load(path, check_existing=False)
    w, h = img.size
    px = np.empty(w * h * 4, np.float32)
    img.pixels.foreach_get(px)
    bpy.data.images.remove(img)
    return px.reshape(h, w, 4)[::-1].copy()  # top row first


def render(tag, frames=FRAMES):
    scene = bpy.context.scene
    scene.render.filepath = os.path.join(OUT, tag + "_")
    bpy.ops.render.render(animation=True)
    for fr in frames:
        arrays[f"{tag}_{fr}"] = read_exr(os.path.join(OUT, f"{tag}_{fr:04d}.exr"))


def setup_scene():
    scene = bpy.context.scene
    for obj in list(bpy.data.objects):
        if obj.type == 'MESH':
            bpy.data.objects.remove(obj)
    cam = scene.camera
    cam.location = args["camera"]["location"]
    cam.rotation_euler = args["camera"]["rotation"]
    cam.data.lens, cam.data.sensor_width, cam.data.sensor_fit = args["camera"]["lens"], 36.0, 'AUTO'
    cam.data.shift_x = args["camera"]["shift_x"]
    r = scene.render
    r.engine = 'CYCLES'
    scene.cycles.samples = 1
    scene.cycles.use_denoising = False
    scene.cycles.seed = 0
    scene.cycles.device = 'CPU'
    r.resolution_x, r.resolution_y = args["resolution"]
    r.resolution_percentage = args["percentage"]
    r.image_settings.file_format = 'OPEN_EXR'
    r.image_settings.color_depth = '32'
    scene.view_settings.view_transform = 'Standard'
    scene.frame_start, scene.frame_end, scene.frame_step = FRAMES[0], FRAMES[1], FRAMES[1] - FRAMES[0]
    return scene


def modules():
    rt = sys.modules[ADDON + ".blender_addon.runtime"]
    rig = importlib.import_module(ADDON + ".hda_backend.rig")
    return rt, rig


def caches():
    """The session's avatar caches (blender_addon/session.py)."""
    return sys.modules[ADDON + ".blender_addon.session"].caches


def add_keyed_avatar(scene, seed=3):
    bpy.ops.hda.add_avatar(seed=seed)
    arm = bpy.context.active_object
    arm.hda.uv_preset = 'tiny'
    arm.location = (0.25, 0.1, arm.location.z)
    arm.rotation_euler = (0.0, 0.0, 0.4)
    arm.scale = (1.05, 1.05, 1.05)
    rt, rig = modules()
    layout = rt.get_layout(rt.get_body(None))
    poses = np.load(args["poses"])
    quats, root = rig.bone_rotations_from_pose(poses["pose"], poses["transl"], layout)
    for f, frame in enumerate(FRAMES):
        for j, name in enumerate(layout.names):
            pb = arm.pose.bones[name]
            pb.rotation_quaternion = quats[f, j].tolist()
            pb.keyframe_insert("rotation_quaternion", frame=frame)
        pelvis = arm.pose.bones["pelvis"]
        pelvis.location = root[f].tolist()
        pelvis.keyframe_insert("location", frame=frame)
    return arm, layout


def key_render(scene, arm):
    arm.hda.enabled = False
    render("empty")
    arm.hda.enabled = True
    render("avatar")
    rt, _ = modules()
    report["errors"] = dict(caches().errors)
    report["timings"] = dict(caches().timings)
    arrays["matrix_world"] = np.array(arm.matrix_world)


def workbench_render(scene, arm):
    """Workbench ignores ray visibility: the shadow-only proxy must be hidden while it renders, and
    shadow-only again after."""
    proxy, seen = arm.hda.proxy, []

    def during(scene, *_):
        seen.append(scene.objects[proxy.name].hide_render)

    report["proxy_before_workbench"] = {n: getattr(proxy, n) for n in PROXY_FLAGS}
    bpy.app.handlers.render_pre.append(during)
    scene.render.engine = 'BLENDER_WORKBENCH'
    bpy.ops.render.render()
    scene.render.engine = 'CYCLES'
    bpy.app.handlers.render_pre.remove(during)
    report["workbench_proxy"] = {"during": seen, "after": {n: getattr(proxy, n) for n in PROXY_FLAGS}}


def enable(zip_path=None):
    if zip_path:
        report["install"] = sorted(bpy.ops.extensions.package_install_files(
            filepath=zip_path, repo="user_default", enable_on_install=True))
    else:
        bpy.ops.preferences.addon_enable(module=ADDON)
    if args.get("python_path"):
        bpy.context.preferences.addons[ADDON].preferences.python_path = args["python_path"]


def phase_main():
    before = handler_snapshot()
    enable(args["zip"])
    report["torch_at_register"] = "torch" in sys.modules
    scene = setup_scene()
    objects = sorted(o.name for o in bpy.data.objects)

    # In background mode the first push only creates the undo stack.
    bpy.ops.ed.undo_push(message="undo stack")
    bpy.ops.ed.undo_push(message="before add")
    report["add"] = call(bpy.ops.hda.add_avatar, seed=5)
    report["after_add"] = sorted(o.name for o in bpy.data.objects)
    report["undo"] = call(bpy.ops.ed.undo)
    report["after_undo"] = sorted(o.name for o in bpy.data.objects)
    report["objects_before_add"] = objects
    scene = bpy.context.scene  # undo replaced every ID: take fresh references

    arm, layout = add_keyed_avatar(scene)
    proxy = arm.hda.proxy
    report["avatar"] = {"name": arm.name, "uid": arm.hda.uid, "bones": sorted(b.name for b in arm.data.bones),
                        "parents": [arm.data.bones[n].parent and arm.data.bones[n].parent.name for n in layout.names],
                        "modes": sorted({pb.rotation_mode for pb in arm.pose.bones}),
                        "proxy": proxy.name, "proxy_faces": len(proxy.data.polygons),
                        "proxy_groups": sorted(g.name for g in proxy.vertex_groups),
                        "proxy_visibility": {n: getattr(proxy, n) for n in PROXY_FLAGS}, "proxy_parent": proxy.parent.name,
                        "proxy_modifiers": [(m.type, getattr(m, "object", None) and m.object.name)
                                            for m in proxy.modifiers]}
    arrays["matrix_local"] = np.array([np.array(arm.data.bones[n].matrix_local) for n in layout.names])
    rt, rig = modules()
    for frame in FRAMES:
        scene.frame_set(frame)
        dg = bpy.context.evaluated_depsgraph_get()
        ev = arm.evaluated_get(dg)
        arrays[f"bones_world_{frame}"] = np.array([np.array(ev.matrix_world @ ev.pose.bones[n].matrix)
                                                   for n in layout.names])
        arrays[f"read_pose_{frame}"], arrays[f"read_transl_{frame}"] = rt.read_pose(arm, dg, layout)
    # The camera as the backend sees it against Blender's own projection of world points.
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector
    dg = bpy.context.evaluated_depsgraph_get()
    w, h = sys.modules[ADDON + ".blender_addon.layers"].render_size(scene)
    viewmat, K = rt.camera_matrices(arm, dg, scene.camera, w, h)
    pts = np.random.default_rng(0).normal(0, 0.6, (40, 3)) + np.array(arm.matrix_world.translation)
    arrays["cam_points"] = pts
    arrays["cam_ndc"] = np.array([tuple(world_to_camera_view(scene, scene.camera, Vector(p))) for p in pts])
    arrays["cam_viewmat"], arrays["cam_K"] = viewmat, K
    arrays["arm_world"] = np.array(arm.matrix_world)
    report["render_size"] = [w, h]

    key_render(scene, arm)
    workbench_render(scene, arm)
    misses = caches().stats["misses"]
    render("again")
    report["again_misses"] = caches().stats["misses"] - misses
    # The Frame Cache preference at 0: the cache empties at once, and the same frames render again.
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.frame_cache_mb = 0
    report["cache_after_off"] = [len(caches().frames), caches().frame_bytes]
    stats = dict(caches().stats)
    render("uncached")
    report["uncached"] = [caches().stats["hits"] - stats["hits"], caches().stats["misses"] - stats["misses"],
                          len(caches().frames)]
    prefs.frame_cache_mb = 256

    bpy.ops.mesh.primitive_cube_add(size=0.35, location=args["cube"])
    cube = bpy.context.active_object
    render("occluded")
    arm.hda.enabled = False
    render("cube")
    arm.hda.enabled = True
    bpy.data.objects.remove(cube)

    report["checksum_3"] = float(sum(p.double().sum() for p in rt.get_avatar(arm).unet.parameters()))
    compositor_nodes = scene.compositing_node_group.nodes if bpy.app.version >= (5, 0, 0) else scene.node_tree.nodes
    report["nodes_one"] = sorted(n.name for n in compositor_nodes)

    # A second avatar: its own identity, cache entry and compositor chain.
    bpy.ops.hda.add_avatar(seed=7)
    second = bpy.context.active_object
    second.hda.uv_preset = 'tiny'
    second.location = (arm.location.x + 0.9, arm.location.y, second.location.z)
    scene.frame_set(1)
    render("two", frames=(1,))
    report["checksum_7"] = float(sum(p.double().sum() for p in rt.get_avatar(second).unet.parameters()))
    report["cache_keys"] = sorted({k for k in caches().avatars})
    report["nodes_two"] = sorted(n.name for n in compositor_nodes)
    second.hda.enabled = False
    report["nodes_disabled"] = sorted(n.name for n in compositor_nodes)
    for obj in (second.hda.proxy, second):
        bpy.data.objects.remove(obj)

    # Bad files are reported, never raised into Blender, and change nothing.
    bad = os.path.join(OUT, "corrupt.hda.safetensors")
    with open(bad, "wb") as fh:
        fh.write(b"\x00garbage" * 10)
    count = len(bpy.data.objects)
    bpy.context.view_layer.objects.active = arm
    report["load_corrupt"] = call(bpy.ops.hda.load_avatar, filepath=bad)
    report["load_missing"] = call(bpy.ops.hda.load_avatar, filepath=os.path.join(OUT, "nowhere.hda.safetensors"))
    report["path_after_bad_load"] = arm.hda.avatar_path
    report["add_corrupt"] = call(bpy.ops.hda.add_avatar, filepath=bad)
    report["objects_after_bad_add"] = len(bpy.data.objects) - count
    # A bad avatar file at render time fails the render: tests/test_blender_farm.py.

    report["save"] = call(bpy.ops.wm.save_as_mainfile, filepath=args["blend"])
    image = bpy.data.images[sys.modules[ADDON + ".blender_addon.layers"].image_name(arm)]
    report["saved_image"] = [image.filepath, image.source]
    report["bake"] = call(bpy.ops.hda.bake_layer)
    report["baked_files"] = sorted(os.listdir(os.path.join(os.path.dirname(args["blend"]), "hda_layers", "avatar", arm.hda.uid)))

    report["disable"] = sorted(bpy.ops.preferences.addon_disable(module=ADDON))
    after = handler_snapshot()
    report["handlers_left"] = {k: [before.get(k), after[k]] for k in after if before.get(k) != after[k]}
    report["object_hda_left"] = hasattr(bpy.types.Object, "hda")
    report["runtime_after_disable"] = [len(caches().avatars), len(caches().frames)]


def phase_reload():
    enable()
    bpy.ops.wm.open_mainfile(filepath=args["blend"])
    scene = bpy.context.scene
    arm = next(o for o in scene.objects if o.type == 'ARMATURE')
    h = arm.hda
    report["props"] = [h.is_avatar, h.uid, h.seed, h.uv_preset, h.avatar_path, h.enabled, h.proxy.name]
    render("reload")
    # Undo restores the data; the session caches hold no Blender references to go stale.
    bpy.ops.ed.undo_push(message="undo stack")
    bpy.ops.ed.undo_push(message="loaded")
    h.seed = 4
    bpy.ops.ed.undo_push(message="seed 4")
    render("seed4", frames=(1,))
    report["undo"] = call(bpy.ops.ed.undo)
    arm = next(o for o in bpy.context.scene.objects if o.type == 'ARMATURE')
    report["seed_after_undo"] = arm.hda.seed
    render("undone", frames=(1,))


def phase_farm():
    bpy.ops.wm.open_mainfile(filepath=args["blend"])
    report["addon_loaded"] = any(m.startswith(ADDON) for m in sys.modules)
    render("farm")


def phase_key():
    enable(args["zip"])
    scene = setup_scene()
    arm, _ = add_keyed_avatar(scene)
    key_render(scene, arm)
    workbench_render(scene, arm)


def phase_native():
    enable(args["zip"])
    report["torch_at_register"] = "torch" in sys.modules
    scene = setup_scene()
    scene.cycles.samples = args["samples"]
    scene.cycles.pixel_filter_type = 'BOX'  # the rasterizer samples pixel centres (no wider filter)
    scene.cycles.filter_width = 1.0
    arm, _ = add_keyed_avatar(scene)
    arm.hda.enabled = False
    render("empty")
    arm.hda.enabled = True
    arm.hda.render_path = 'NATIVE'
    splats = arm.hda.splats
    compositor_nodes = scene.compositing_node_group.nodes
    report["native"] = {"splats": splats.name, "parent": splats.parent.name, "type": splats.data.type,
                        "layer_nodes": sorted(n.name for n in compositor_nodes if n.name.startswith("HDA Layer"))}
    render("native")
    report["points"] = len(splats.data.points)
    report["errors"] = dict(caches().errors)
    arrays["matrix_world"] = np.array(arm.matrix_world)

    # Posing without a frame change: the depsgraph update rewrites the splats for the new pose.
    scene.frame_set(1)
    arm.pose.bones["left_shoulder"].rotation_quaternion = (0.7071, 0.0, 0.0, 0.7071)
    bpy.context.view_layer.update()
    rt, _ = modules()
    layout = rt.get_layout(rt.get_avatar(arm).body)
    arrays["posed_pose"], arrays["posed_transl"] = rt.read_pose(arm, bpy.context.evaluated_depsgraph_get(), layout)
    positions = np.empty(len(splats.data.points) * 3, np.float32)
    splats.data.attributes["position"].data.foreach_get("vector", positions)
    arrays["posed_positions"] = positions.reshape(-1, 3)

    # An identity from the bundled diffusion model and an imported clip, on the native path.
    bpy.context.view_layer.objects.active = arm
    report["sample"] = call(bpy.ops.hda.sample_identity, steps=2)
    report["import"] = call(bpy.ops.hda.import_motion, filepath=args["clip"], frame_start=1)
    report["avatar_file"] = bpy.path.abspath(arm.hda.avatar_path)
    scene.frame_start = scene.frame_end = 1
    render("sampled", frames=(1,))
    rt, _ = modules()
    scene.frame_set(1)
    layout = rt.get_layout(rt.get_avatar(arm).body)
    arrays["sampled_pose"], arrays["sampled_transl"] = rt.read_pose(arm, bpy.context.evaluated_depsgraph_get(), layout)
    report["sampled_points"] = len(splats.data.points)
    report["sampled_errors"] = dict(caches().errors)
    arm.hda.render_path = 'LAYER'
    report["splats_after_layer"] = [arm.hda.splats is None, [o.name for o in bpy.data.objects if o.type == 'POINTCLOUD']]


def native_scene(samples):
    scene = setup_scene()
    scene.cycles.samples = samples
    scene.cycles.pixel_filter_type = 'BOX'  # the rasterizer samples pixel centres (no wider filter)
    scene.cycles.filter_width = 1.0
    return scene


def phase_native_bake():
    enable(args["zip"])
    scene = native_scene(args["samples"])
    arm, _ = add_keyed_avatar(scene)
    arm.hda.render_path = 'NATIVE'
    bpy.ops.wm.save_as_mainfile(filepath=args["blend"])
    report["bake"] = call(bpy.ops.hda.bake_layer)
    mod = arm.hda.splats.modifiers.get("HDA Farm Splats")
    report["modifier_live"] = [mod.show_render, mod.show_viewport]
    bpy.ops.wm.save_mainfile()
    report["modifier_after_save"] = mod.show_render
    bpy.ops.preferences.addon_disable(module=ADDON)
    report["modifier_disabled"] = mod.show_render   # no add-on: the baked frames are the splats
    bpy.ops.preferences.addon_enable(module=ADDON)
    report["modifier_enabled"] = mod.show_render
    # The add-on without a working backend (as on a farm without torch): the current bake stands in.
    rt = sys.modules[ADDON + ".blender_addon.runtime"]
    get_avatar = rt.get_avatar

    def no_backend(obj):
        raise ImportError("No module named 'torch'")

    rt.get_avatar = no_backend
    scene.frame_set(FRAMES[1])
    cloud = arm.hda.splats.evaluated_get(bpy.context.evaluated_depsgraph_get()).data
    positions = np.empty(len(cloud.points) * 3, np.float32)
    cloud.attributes["position"].data.foreach_get("vector", positions)
    arrays["fallback_positions"] = positions.reshape(-1, 3)
    report["fallback"] = [mod.show_render, dict(caches().errors)]
    rt.get_avatar = get_avatar
    scene.frame_set(FRAMES[0])
    report["fallback_restored"] = mod.show_render
    folder = os.path.join(os.path.dirname(args["blend"]), "hda_splats", "avatar", arm.hda.uid)
    report["baked"] = sorted(os.listdir(folder))
    report["uid"] = arm.hda.uid
    report["check_fresh"] = sys.modules[ADDON + ".blender_addon.farm"].check_scene(scene)
    arrays["matrix_world"] = np.array(arm.matrix_world)
    # A pose changed after the bake: Check for Farm names the frame (the file is not saved).
    pb = arm.pose.bones["left_shoulder"]
    pb.rotation_quaternion = (0.7071, 0.0, 0.0, 0.7071)
    pb.keyframe_insert("rotation_quaternion", frame=FRAMES[1])
    report["check_stale_op"] = call(bpy.ops.hda.check_farm)
    report["check_stale"] = list(caches_farm().lines)
    # The camera moved (the widening depends on it) and the range grew by a frame never baked.
    scene.camera.location.x += 0.1
    scene.frame_end = FRAMES[1] + (FRAMES[1] - FRAMES[0])
    report["check_camera_range"] = sys.modules[ADDON + ".blender_addon.farm"].check_scene(scene)


def caches_farm():
    return sys.modules[ADDON + ".blender_addon.session"].farm


def phase_native_farm():
    bpy.ops.wm.open_mainfile(filepath=args["blend"])
    report["addon_loaded"] = any(m.startswith(ADDON) for m in sys.modules)
    scene = bpy.context.scene
    splats = next(o for o in scene.objects if o.type == 'POINTCLOUD')
    mod = splats.modifiers["HDA Farm Splats"]
    report["modifier_saved"] = [mod.show_render, mod.node_group is not None]
    render("farm")
    splats.hide_render = True
    render("empty")
    splats.hide_render = False
    # A frame with no baked file: the saved splats in magenta, not an empty frame.
    scene.frame_set(FRAMES[1] + 1)
    cloud = splats.evaluated_get(bpy.context.evaluated_depsgraph_get()).data
    base = np.empty(len(cloud.points) * 4, np.float32)
    report["missing_frame_type"] = cloud.attributes["radiance:base"].data_type
    cloud.attributes["radiance:base"].data.foreach_get("color", base)
    report["missing_frame"] = {"points": len(cloud.points), "saved_points": len(splats.data.points),
                               "sh": sorted(a.name for a in cloud.attributes if a.name.startswith("radiance:sh"))}
    arrays["missing_base"] = base.reshape(-1, 4)
    # A pose changed after the bake, saved without the add-on: for hda check-blend.
    arm = splats.parent
    pb = arm.pose.bones["left_shoulder"]
    pb.rotation_quaternion = (0.7071, 0.0, 0.0, 0.7071)
    pb.keyframe_insert("rotation_quaternion", frame=FRAMES[1])
    bpy.ops.wm.save_mainfile()


{"main": phase_main, "reload": phase_reload, "farm": phase_farm, "key": phase_key,
 "native": phase_native, "native_bake": phase_native_bake, "native_farm": phase_native_farm}[args["phase"]]()
with open(os.path.join(OUT, "report.json"), "w") as fh:
    json.dump(report, fh)
np.savez(os.path.join(OUT, "arrays.npz"), **arrays)
