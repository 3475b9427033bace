"""The Blender half of ``make demo``: builds, renders, saves and bakes the demo scene through the
extension's own operators. scripts/demo.py runs it in a child process (``python demo_blender.py
ARGS.json``, bpy as a module) with a throw-away Blender user folder; nothing here touches torch
directly: every avatar step is an ``hda.*`` operator of the installed extension.

The scene (Blender Z up, metres; the camera looks along +Y):

- a walker (the first identity) crossing from left to right on the ``walk`` clip, and, with two or
  more identities, a second person standing behind and to the right, waving;
- a pillar between the camera and the walker's path, placed where the walker is halfway through the
  shot, so the depth test of the compositing is visible (the pillar hides the walker as it passes);
- a chequered ground plane, a sun with soft shadows, a blue-grey sky; the avatars' proxy meshes (shadow-only
  casters, the extension's default) give each person a shadow that follows the pose.

ARGS (JSON): zip (the extension), addon (its module name once installed), blend (where to save),
model (the diffusion model), people [{seed, role: walk|wave, motion: an .npz}], size, samples (Cycles),
frames_dir (beside the .blend), video (an .mp4 path, or null for none). Progress goes to stdout as
``DEMO-STAGE <name> <seconds>`` and ``DEMO-FRAME <frame>`` lines; ``DEMO-REPORT <json>`` ends a
successful run; a failure prints ``DEMO-ERROR <one line>`` and exits with status 1.
"""

import json
import math
import os
import sys
import time

ARGS = json.load(open(sys.argv[1]))

import bpy  # noqa: E402
from mathutils import Vector  # noqa: E402

CAMERA_AT = Vector((0.15, -5.2, 1.35))
CAMERA_TARGET = Vector((0.15, 0.0, 0.9))
LENS_MM = 50.0
WALK_LINE_Y = 0.0             # the walker's path (along +X)
WALK_CENTRE_X = -0.55
WAVER_AT = Vector((1.2, 0.9, 0.0))
WAVER_TURN = -0.35            # radians about Z: faces a little towards the walker
PILLAR_SIZE = (0.32, 0.32, 2.5)
PILLAR_Y = -1.0               # between the camera and the walk line
COLONNADE_Y = 3.4
COLONNADE_X = (-3.9, -2.3, -0.7, 0.9, 2.5, 4.1)


class DemoError(Exception):
    """A step of the scene failed; its one line goes to the parent as DEMO-ERROR."""


_clock = [time.perf_counter()]
stages: dict = {}


def stage(name: str) -> None:
    now = time.perf_counter()
    stages[name] = round(now - _clock[0], 2)
    _clock[0] = now
    print(f"DEMO-STAGE {name} {stages[name]:.2f}", flush=True)


def run_op(op, **kw) -> None:
    """Call an operator; its ERROR report (a RuntimeError in background mode) becomes a DemoError."""
    try:
        result = op(**kw)
    except RuntimeError as exc:
        raise DemoError(f"{op.idname_py()}: {' '.join(str(exc).split())}") from None
    if 'FINISHED' not in result:
        raise DemoError(f"{op.idname_py()}: {sorted(result)}")


def material(name: str, color, roughness=0.6, checker=None):
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    bsdf = mat.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Roughness"].default_value = roughness
    if checker is None:
        bsdf.inputs["Base Color"].default_value = (*color, 1.0)
        return mat
    tex = mat.node_tree.nodes.new("ShaderNodeTexChecker")
    tex.inputs["Color1"].default_value = (*color, 1.0)
    tex.inputs["Color2"].default_value = (*checker, 1.0)
    tex.inputs["Scale"].default_value = 40.0
    mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def clear_scene(scene) -> None:
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj)
    scene.cursor.location = (0, 0, 0)


def set_render(scene) -> None:
    r = scene.render
    r.engine = 'CYCLES'
    scene.cycles.device = 'CPU'
    scene.cycles.samples = ARGS["samples"]
    scene.cycles.use_adaptive_sampling = True
    scene.cycles.use_denoising = True
    scene.cycles.seed = 0
    scene.cycles.max_bounces = 4
    scene.cycles.denoiser = 'OPENIMAGEDENOISE'
    scene.cycles.denoising_prefilter = scene.cycles.denoising_quality = 'FAST'
    scene.cycles.caustics_reflective = scene.cycles.caustics_refractive = False
    r.use_persistent_data = True   # an animation: keep Cycles' scene between frames
    r.resolution_x = r.resolution_y = ARGS["size"]
    r.resolution_percentage = 100
    r.film_transparent = False
    r.image_settings.file_format = 'PNG'
    r.image_settings.color_mode = 'RGB'
    r.image_settings.color_depth = '8'
    # The avatar layer is the backend's sRGB colour linearised (runtime.to_layer); Standard gives it back.
    scene.view_settings.view_transform = 'Standard'
    scene.view_settings.look = 'None'
    r.filepath = "//" + ARGS["frames_dir"] + "/frame_"


def build_stage(scene) -> None:
    """Camera, sun, sky and ground: what the people stand in."""
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    cam.location = CAMERA_AT
    cam.rotation_euler = (CAMERA_TARGET - CAMERA_AT).to_track_quat('-Z', 'Y').to_euler()
    cam.data.lens = LENS_MM
    cam.data.sensor_width = 36.0
    scene.camera = cam

    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", 'SUN'))
    scene.collection.objects.link(sun)
    sun.data.energy = 2.6
    sun.data.angle = math.radians(4.0)
    sun.rotation_euler = (math.radians(48), math.radians(-8), math.radians(-35))

    # Sky: a hazy horizon fading to blue overhead (the view direction's height picks the colour).
    world = bpy.data.worlds.new("Sky")
    world.use_nodes = True
    nodes, links = world.node_tree.nodes, world.node_tree.links
    coords = nodes.new("ShaderNodeTexCoord")
    height = nodes.new("ShaderNodeSeparateXYZ")
    ramp = nodes.new("ShaderNodeValToRGB")
    ramp.color_ramp.elements[0].color = (0.62, 0.66, 0.72, 1.0)
    ramp.color_ramp.elements[1].position = 0.45
    ramp.color_ramp.elements[1].color = (0.22, 0.36, 0.62, 1.0)
    links.new(coords.outputs["Generated"], height.inputs[0])
    links.new(height.outputs["Z"], ramp.inputs["Fac"])
    background = nodes["Background"]
    links.new(ramp.outputs["Color"], background.inputs["Color"])
    background.inputs["Strength"].default_value = 0.8
    scene.world = world

    bpy.ops.mesh.primitive_plane_add(size=40.0, location=(0, 0, 0))
    ground = bpy.context.active_object
    ground.name = "Ground"
    ground.data.materials.append(material("Ground", (0.36, 0.34, 0.31), 0.8, checker=(0.27, 0.26, 0.24)))
    # A colonnade behind the people: something to be in front of.
    stone = material("Stone", (0.5, 0.45, 0.38), 0.7)
    for x in COLONNADE_X:
        box(f"Column {x:+.1f}", (x, COLONNADE_Y, PILLAR_SIZE[2] / 2), PILLAR_SIZE, stone)
    span, middle = COLONNADE_X[-1] - COLONNADE_X[0] + 1.0, 0.5 * (COLONNADE_X[0] + COLONNADE_X[-1])
    box("Lintel", (middle, COLONNADE_Y, PILLAR_SIZE[2] + 0.15), (span, 0.5, 0.3), stone)


def box(name: str, location, size, mat):
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=location)
    obj = bpy.context.active_object
    obj.name = name
    obj.scale = size
    obj.data.materials.append(mat)
    return obj


def add_person(scene, person: dict, index: int):
    """hda.add_avatar -> hda.sample_identity -> hda.import_motion, placed for its role."""
    if person["role"] == "walk":
        scene.cursor.location = (0.0, WALK_LINE_Y, 0.0)
    else:
        scene.cursor.location = WAVER_AT
    run_op(bpy.ops.hda.add_avatar, seed=person["seed"])
    arm = bpy.context.active_object
    arm.name = f"Person_{index}_{person['role']}"
    # The body faces -Y in Blender (towards the camera); the walker turns to walk along +X.
    arm.rotation_euler = (0.0, 0.0, math.pi / 2 if person["role"] == "walk" else WAVER_TURN)
    run_op(bpy.ops.hda.sample_identity, model=ARGS["model"])
    run_op(bpy.ops.hda.import_motion, filepath=person["motion"], fps_mode='SCENE_FPS', frame_start=1,
           set_frame_range=True)
    return arm


def pelvis_x(scene, walker, frame: int) -> float:
    scene.frame_set(frame)
    evaluated = walker.evaluated_get(bpy.context.evaluated_depsgraph_get())
    return (evaluated.matrix_world @ evaluated.pose.bones["pelvis"].head).x


def centre_walk(scene, walker) -> float:
    """Shift the walker so its path is centred on WALK_CENTRE_X; returns its pelvis' x halfway through."""
    first, last = scene.frame_start, scene.frame_end
    start, middle, end = (pelvis_x(scene, walker, f) for f in (first, (first + last) // 2, last))
    shift = WALK_CENTRE_X - 0.5 * (start + end)
    walker.location.x += shift
    scene.frame_set(first)
    return middle + shift


def add_pillar(x: float):
    return box("Pillar", (x, PILLAR_Y, PILLAR_SIZE[2] / 2), PILLAR_SIZE, material("Pillar", (0.55, 0.24, 0.16), 0.5))


def render_frames(scene) -> list:
    def on_frame(scene_, *_):
        print(f"DEMO-FRAME {scene_.frame_current}", flush=True)

    bpy.app.handlers.render_post.append(on_frame)
    try:
        bpy.ops.render.render(animation=True)
    finally:
        bpy.app.handlers.render_post.remove(on_frame)
    frames = [bpy.path.abspath(scene.render.frame_path(frame=f)) for f in range(scene.frame_start, scene.frame_end + 1)]
    missing = [f for f in frames if not os.path.isfile(f)]
    if missing:
        raise DemoError(f"render: frame file {missing[0]} was not written")
    return frames


def encode_video(frames: list, fps: int, path: str) -> None:
    """The rendered PNGs as an H.264 MP4 through the sequencer of a scene of its own (not saved)."""
    video = bpy.data.scenes.new("HDA Demo Video")
    editor = video.sequence_editor_create()
    strip = editor.strips.new_image("frames", frames[0], channel=1, frame_start=1)
    for name in frames[1:]:
        strip.elements.append(os.path.basename(name))
    video.frame_start, video.frame_end = 1, len(frames)
    r = video.render
    r.fps, r.fps_base = fps, 1.0
    r.resolution_x, r.resolution_y, r.resolution_percentage = ARGS["size"], ARGS["size"], 100
    r.use_sequencer = True
    r.image_settings.media_type = 'VIDEO'
    r.ffmpeg.format = 'MPEG4'
    r.ffmpeg.codec = 'H264'
    r.ffmpeg.constant_rate_factor = 'HIGH'
    video.view_settings.view_transform = 'Standard'  # the PNGs are display colours already
    r.filepath = path  # ends in .mp4, so Blender adds no frame range to the name
    bpy.ops.render.render(animation=True, scene=video.name)
    if not os.path.isfile(path):
        raise DemoError(f"video: {path} was not written")


def runtime_errors() -> dict:
    session = sys.modules.get(ARGS["addon"] + ".blender_addon.session")
    return dict(session.caches.errors) if session is not None else {}


def main() -> dict:
    installed = bpy.ops.extensions.package_install_files(filepath=ARGS["zip"], repo="user_default",
                                                          enable_on_install=True)
    if 'FINISHED' not in installed or not hasattr(bpy.ops.hda, "add_avatar"):
        raise DemoError(f"installing {ARGS['zip']}: {sorted(installed)}")
    stage("install")
    bpy.context.preferences.filepaths.save_version = 0  # no demo.blend1 backups
    scene = bpy.context.scene
    clear_scene(scene)
    set_render(scene)
    # Saved first: identities, layers and motion keys then live next to the .blend, '//'-relative.
    bpy.ops.wm.save_as_mainfile(filepath=ARGS["blend"])
    build_stage(scene)
    people = [add_person(scene, person, i) for i, person in enumerate(ARGS["people"])]
    stage("people")
    mid_x = centre_walk(scene, people[0])
    add_pillar(mid_x)
    for obj in people:
        obj.select_set(False)
    scene.frame_set(scene.frame_start)
    bpy.ops.wm.save_mainfile()
    stage("scene")
    frames = render_frames(scene)
    errors = runtime_errors()
    if errors:
        raise DemoError(f"avatar render: {next(iter(errors.values()))}")
    stage("render")
    bpy.ops.wm.save_mainfile()
    run_op(bpy.ops.hda.bake_layer)
    stage("save_bake")
    fps = scene.render.fps
    if ARGS["video"] and bpy.app.ffmpeg.supported:
        encode_video(frames, fps, ARGS["video"])
        stage("video")
    return {
        "blender": bpy.app.version_string, "frames": frames, "fps": fps, "stages": stages,
        "avatars": [{"name": a.name, "seed": a.hda.seed, "avatar_path": a.hda.avatar_path, "uid": a.hda.uid,
                     "action": a.animation_data.action.name} for a in people],
    }


try:
    report = main()
except DemoError as exc:
    print(f"DEMO-ERROR {exc}", flush=True)
    sys.exit(1)
print("DEMO-REPORT " + json.dumps(report), flush=True)
