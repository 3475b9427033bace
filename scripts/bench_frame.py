#!/usr/bin/env python3
"""Per-frame milliseconds of an avatar in Blender, final render and viewport, against its float32 UNet.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_frame.py [--preset cpu] [--size 512] [--frames 20]

(``make bench`` runs it.) Runs real Blender (bpy): builds and installs the extension into a temporary
user folder, adds an avatar, keys a different random pose on every frame, then for each frame times
the stages the final-render handler runs (blender_addon.layers.write_frame), called one by one:

    pose      read the evaluated armature (pose_bone.matrix of 55 bones) and the camera -> SMPL-X pose
    maps      UV pose maps: the mean template posed by LBS, normals, texel interpolation
    unet      the avatar UNet
    gaussians texel gather, skinning transforms, decoding (paper Eq. 7)
    raster    the Gaussian rasterizer, RGB + expected depth
    glue      linear premultiplied layer + EXR encoding and atomic write

once through the fast paths the add-on runs (hda_backend.avatar.realtime, hda_backend.layer, the layer
file written with raw blocks and compressed on a background thread, hda_backend.layer_writer) and once through their float32 reference twins (the path before them), and, as a check, the
whole handler path end to end (``handler``: runtime.render_avatar + the file, frame cache off).

The viewport part plays the same keyed clip in a 1280x720 view at the playback (navigation)
resolution in a GPU context (a RenderEngine with ``bl_use_gpu_context``, the only one background
Blender lends; software GL here): first serially, stage by stage (pose read, pose -> Gaussians,
rasterize + layer, texture upload + draw), then through the viewport's worker
(hda_backend.latest.LatestWins with hda_backend.preview's two stages on their own threads, upload and
draw on the main thread) while the clip plays at 24 fps: images drawn per second, and the latency from
a pose submitted to its image drawn. Last, the viewport's level of detail while playing (requests with
``lod``: the pose stage re-skins the last UNet output, the UNet on every REFRESH_FRAMES-th frame) plays
a 24 fps walk (hda_backend.motion, one cycle per second: the keyed clip's random poses are not a
motion) through the same worker, for this avatar (``LOD``) and each bundled reference avatar
(``LOD subject_...``, trained: the PSNR that counts), with the add-on's look-ahead (each request names
the pose REFRESH_FRAMES frames on; the main thread's prediction, blender_addon.playback.ahead_pose on
the keyed armature, runs at every tick inside the latency) and without it (``no look-ahead``), and
each image drawn is compared with the full-quality image of its frame (PSNR of the layer's RGBA inside
the box the person covers). Then the level of detail's images on every built-in motion, serially
(``LOD by motion``).

Every frame also times the float32 channels-last UNet forward on that frame's maps, and each ratio is
taken frame by frame against it, so the ratios hold on any machine and under load; medians are
printed, with the CPU features used and the load average. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from build_extension import run_with_built_zip  # scripts/ is sys.path[0] when a script runs

REPO = Path(__file__).resolve().parent.parent
ADDON = "bl_ext.user_default.hda_avatars"
VIEWPORT = (1280, 720)
PLAYBACK_FPS = 24        # the scene rate the viewport is played back at
PLAYBACK_S = 3.0         # seconds of playback through the worker


def _median(values) -> float:
    return statistics.median(values)


def _child(args) -> None:
    import bpy
    import numpy as np
    import torch

    bpy.ops.extensions.package_install_files(filepath=args.zip, repo="user_default", enable_on_install=True)
    runtime = sys.modules[ADDON + ".blender_addon.runtime"]
    layers = sys.modules[ADDON + ".blender_addon.layers"]
    session = sys.modules[ADDON + ".blender_addon.session"]
    objects = sys.modules[ADDON + ".blender_addon.objects"]
    vp = importlib.import_module(ADDON + ".blender_addon.viewport")
    playback = importlib.import_module(ADDON + ".blender_addon.playback")
    preview = importlib.import_module(ADDON + ".hda_backend.preview")
    rig = importlib.import_module(ADDON + ".hda_backend.rig")
    gaussians = importlib.import_module(ADDON + ".hda_backend.avatar.gaussians")
    uvmap = importlib.import_module(ADDON + ".hda_backend.uvmap")
    frames_mod = importlib.import_module(ADDON + ".hda_backend.render.frames")
    exr = importlib.import_module(ADDON + ".hda_backend.exr")
    layer_writer = importlib.import_module(ADDON + ".hda_backend.layer_writer")
    layer = importlib.import_module(ADDON + ".hda_backend.layer")
    atomic = importlib.import_module(ADDON + ".hda_backend.atomic")
    precision = importlib.import_module(ADDON + ".hda_backend.precision")

    scene = bpy.context.scene
    scene.render.resolution_x = scene.render.resolution_y = args.size
    scene.render.resolution_percentage = 100
    scene.camera.location, scene.camera.rotation_euler = (0.0, -4.2, 1.0), (1.5708, 0.0, 0.0)
    bpy.ops.hda.add_avatar(seed=0)
    arm = bpy.context.active_object
    arm.hda.uv_preset = args.preset
    arm.hda.shading = 'FLAT'
    avatar = runtime.get_avatar(arm)
    fast = session.caches.avatars[objects.object_key(arm)][2]
    layout = runtime.get_layout(avatar.body)
    rng = np.random.default_rng(0)
    poses = rng.normal(0, 0.2, (args.frames, 165))
    quats, root = rig.bone_rotations_from_pose(poses, np.zeros((args.frames, 3)), layout)
    for f in range(args.frames):
        for j, name in enumerate(layout.names):
            arm.pose.bones[name].rotation_quaternion = quats[f, j].tolist()
            arm.pose.bones[name].keyframe_insert("rotation_quaternion", frame=f + 1)
    out = Path(tempfile.mkdtemp()) / "layer.exr"
    names = ("pose", "maps", "unet", "gaussians", "raster", "glue", "sum")
    stages = {path: {k: [] for k in names} for path in ("fast", "reference")}
    handler, unet_f32, frame_poses = [], [], []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, preset {args.preset} (UV {avatar.uv_res}, "
          f"{avatar.num_gaussians} Gaussians), image {args.size}x{args.size}")
    print(f"CPU features: torch kernels {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
          f"{'yes' if precision.bf16_native('cpu') else 'no'} -> fast-path UNet in {fast.precision}"
          f"{' (conv + SiLU fused by oneDNN)' if fast.fused else ''}, channels-last; reference UNet float32, channels-last")
    w, h = layers.render_size(scene)
    writer = layer_writer.LayerWriter()  # as the handler's: raw blocks now, compressed on its thread
    sh_degree = avatar.gaussian_config.sh_degree

    def frame_stages(pose_t, transl_t, viewmat, K, reference: bool) -> list[float]:
        """Milliseconds of maps, unet, gaussians, raster, glue through one path."""
        t = [time.perf_counter()]
        if reference:
            maps, posed = avatar.pose_inputs(pose_t)
        else:
            maps, posed = fast.pose_inputs(pose_t)
        t.append(time.perf_counter())
        if reference:
            raw_map = avatar.unet(maps)
        else:
            raw_map = fast.run_unet(maps)
        t.append(time.perf_counter())
        if reference:
            raw = gaussians.gather_texels(raw_map, avatar.binding)
            transforms = uvmap.global_transform(avatar.body, pose_t, transl_t)[:, None] @ posed.transforms
            g = gaussians.decode(raw, avatar.binding, posed.rest_vertices, transforms, avatar.gaussian_config).index(0)
        else:
            raw = raw_map.permute(0, 2, 3, 1).reshape(-1, raw_map.shape[1])[fast.texels].float()[None]
            g = fast.skin(raw, pose_t, transl_t, posed)
        t.append(time.perf_counter())
        img, alpha = frames_mod.render_gaussians(g, torch.as_tensor(viewmat, dtype=torch.float32),
                                                 torch.as_tensor(K, dtype=torch.float32), w, h,
                                                 render_mode="RGB+ED", sh_degree=3 if reference else sh_degree)
        img, alpha = img.numpy(), alpha[..., 0].numpy()
        t.append(time.perf_counter())
        if reference:
            rgba, depth = layer.to_layer_reference(img[..., :3], alpha, img[..., 3])
            atomic.write_bytes(out, exr.encode_exr(exr.layer_channels(rgba, depth), workers=1))
        else:
            rgba, depth = layer.to_layer(img[..., :3], alpha, img[..., 3], dtype=np.float16, planar=True)
            writer.write(out, exr.layer_channels(rgba, depth))
        t.append(time.perf_counter())
        return [1e3 * (b - a) for a, b in zip(t, t[1:])]

    for f in range(-2, args.frames):  # two warm-up frames (numba and oneDNN first calls)
        scene.frame_set(max(f, 0) + 1)
        dg = bpy.context.evaluated_depsgraph_get()
        with torch.inference_mode():
            t0 = time.perf_counter()
            pose, transl = runtime.read_pose(arm, dg, layout)
            viewmat, K = runtime.camera_matrices(arm, dg, scene.camera, w, h)
            pose_t = torch.as_tensor(pose, dtype=torch.float32).reshape(1, 55, 3)
            transl_t = torch.as_tensor(transl, dtype=torch.float32).reshape(1, 3)
            pose_ms = 1e3 * (time.perf_counter() - t0)
            # The pose the viewport's look-ahead predicts while playing (blender_addon.playback), checked
            # against the pose read REFRESH_FRAMES frames later.
            ahead = playback.ahead_pose(arm, scene, pose, layout, preview.REFRESH_FRAMES)
            rows = {path: [pose_ms] + frame_stages(pose_t, transl_t, viewmat, K, path == "reference")
                    for path in ("reference", "fast")}
            maps, _ = fast.pose_inputs(pose_t)
            t0 = time.perf_counter()
            avatar.unet(maps)
            unet_ms = 1e3 * (time.perf_counter() - t0)
        session.caches.frames.clear()
        session.caches.frame_bytes = 0  # the handler path below must render, not hit the cache
        t0 = time.perf_counter()
        layers.write_frame(arm, scene, dg, f + 100)
        handler_ms = 1e3 * (time.perf_counter() - t0)
        if f < 0:
            continue
        frame_poses.append((pose, transl, pose_ms, ahead))
        unet_f32.append(unet_ms)
        handler.append(handler_ms)
        for path, values in rows.items():
            for key, value in zip(names, values + [sum(values)]):
                stages[path][key].append(value)
    print(f"\nfinal render {w}x{h}: ms per frame (median, min) and median per-frame ratio to the float32 UNet")
    print(f"{'stage':<10} {'fast ms':>8} {'min':>6} {'ratio':>6}   {'reference ms':>12} {'min':>6} {'ratio':>6}")

    def ratio(values) -> float:
        return _median([v / u for v, u in zip(values, unet_f32)])

    for key in names:
        fv, rv = stages["fast"][key], stages["reference"][key]
        print(f"{key:<10} {_median(fv):>8.1f} {min(fv):>6.1f} {ratio(fv):>6.2f}   "
              f"{_median(rv):>12.1f} {min(rv):>6.1f} {ratio(rv):>6.2f}")
    print(f"{'handler':<10} {_median(handler):>8.1f} {min(handler):>6.1f} {ratio(handler):>6.2f}   "
          f"(the add-on's handler end to end, fast path)")
    print(f"{'unet f32':<10} {_median(unet_f32):>8.1f} {min(unet_f32):>6.1f} {1.0:>6.2f}   "
          f"(float32 channels-last UNet forward, the reference time)")
    print(f"target: handler <= 1.00x the float32 UNet: {'met' if ratio(handler) <= 1.0 else 'not met'} "
          f"({ratio(handler):.2f}x median of per-frame ratios; {_median(handler) / _median(unet_f32):.2f}x "
          f"ratio of the medians)")
    _viewport(bpy, torch, np, vp, rig, avatar, fast, arm, frame_poses)
    load = os.getloadavg()[0]
    print(f"{args.frames} frames; load average {load:.1f} on {os.cpu_count()} CPUs (other jobs inflate these figures)")


def _viewport(bpy, torch, np, vp, rig, avatar, fast, arm, frame_poses) -> None:
    """The viewport's playback path per frame of the clip, in a GPU context, each frame with its own
    float32 UNet time (the pose read is the one timed by the final-render loop)."""
    preview = importlib.import_module(ADDON + ".hda_backend.preview")
    playback = importlib.import_module(ADDON + ".blender_addon.playback")
    motion = importlib.import_module(ADDON + ".hda_backend.motion")
    psnr = importlib.import_module(ADDON + ".hda_backend.fit.losses").psnr
    LatestWins = importlib.import_module(ADDON + ".hda_backend.latest").LatestWins
    width, height = VIEWPORT
    w, h = vp.render_size(width, height, True)  # playback: the navigation resolution
    cam = bpy.data.objects.new("bench_view", bpy.data.cameras.new("bench_view"))
    bpy.context.scene.collection.objects.link(cam)
    cam.location, cam.rotation_euler = (0.5, -4.0, 1.2), (1.45, 0.0, 0.1)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    proj = np.array(cam.calc_matrix_camera(depsgraph, x=width, y=height))
    view = np.linalg.inv(np.array(cam.matrix_world))
    viewmat, K, shift = rig.viewport_camera(view, proj, w, h, np.array(arm.matrix_world))
    rows = {k: [] for k in ("pose", "gaussians", "raster+layer", "upload+draw", "total", "unet f32")}
    ratios = []
    look_ms = []
    scene = bpy.context.scene
    layout = importlib.import_module(ADDON + ".blender_addon.runtime").get_layout(avatar.body)

    def look_ahead(_):
        """The add-on's main-thread look-ahead, on the keyed clip's armature at the scene's frame (the
        last of the clip): its cost; the walk's own ahead poses are in the requests."""
        assert playback.ahead_pose(arm, scene, frame_poses[-1][0], layout, preview.REFRESH_FRAMES) is not None
    requests = [preview.PreviewRequest(fast, np.asarray(pose, np.float32), np.asarray(transl, np.float32),
                                       np.asarray(pose, np.float32).tobytes() + np.asarray(transl, np.float32).tobytes(),
                                       viewmat, K, w, h, "flat", avatar.gaussian_config.sh_degree)
                for pose, transl, *_ in frame_poses]
    walk = motion.procedural("walk", PLAYBACK_FPS, float(PLAYBACK_FPS)).poses.reshape(PLAYBACK_FPS, -1).numpy()
    # The LOD on this avatar (an untrained consistent-init UNet, whose output hardly depends on the
    # pose, so its PSNR says little) and on the bundled references (trained: the PSNR that counts).
    io = importlib.import_module(ADDON + ".hda_backend.avatar.io")
    realtime = importlib.import_module(ADDON + ".hda_backend.avatar.realtime")
    lod_avatars = {"LOD": (avatar, fast)}
    for path in sorted((REPO / "assets" / "default" / "references").glob("*" + io.SUFFIX)):
        ref_avatar = io.load_avatar(path, avatar.body).eval()
        ref_avatar.unet.to(memory_format=torch.channels_last)
        lod_avatars["LOD " + path.name.split(".")[0]] = (ref_avatar, realtime.RealtimeAvatar(ref_avatar, fast.precision))
    worker_rows = {}
    # The viewport's worker (two stages, each on its own thread) and its one-thread variant (both
    # stages one after the other on one worker thread), each played back the same way.
    class OneThread:
        """Both stages in turn on one worker thread; the pose stage's follow-up after the raster."""

        def __init__(self):
            self.pose = preview.PoseStage()

        def __call__(self, request):
            return preview.raster_stage(self.pose(request))

        def follow_up(self, wait):
            self.pose.follow_up(wait)

    WORKERS = {"two threads": (preview.PoseStage, lambda: preview.raster_stage), "one thread": (OneThread,)}

    class Probe(bpy.types.RenderEngine):
        bl_idname = "HDA_BENCH_VIEWPORT"
        bl_label = "HDA bench viewport"
        bl_use_gpu_context = True

        def render(self, depsgraph):
            import gpu

            off = gpu.types.GPUOffScreen(width, height, format='RGBA16F')
            with off.bind():
                for i, request in enumerate([requests[0]] + requests):
                    pose_ms = frame_poses[max(i - 1, 0)][2]
                    t0 = time.perf_counter()
                    posed = preview.PoseStage()(request)
                    t1 = time.perf_counter()
                    rgba, depth = preview.raster_stage(posed)
                    t2 = time.perf_counter()
                    draw(rgba, depth)
                    t3 = time.perf_counter()
                    with torch.inference_mode():  # the float32 UNet on this frame's maps, now
                        maps, _ = fast.pose_inputs(torch.as_tensor(request.pose, dtype=torch.float32).reshape(1, 55, 3))
                        t4 = time.perf_counter()
                        avatar.unet(maps)
                        unet_ms = 1e3 * (time.perf_counter() - t4)
                    if i == 0:
                        continue  # warm-up: the shader is built in the first draw
                    ms = [pose_ms, 1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (t3 - t2)]
                    for key, value in zip(rows, ms + [sum(ms), unet_ms]):
                        rows[key].append(value)
                    ratios.append(sum(ms) / unet_ms)
                for i in range(len(requests)):  # the main thread's look-ahead while playing, on its own
                    t0 = time.perf_counter()
                    look_ahead(i)
                    look_ms.append(1e3 * (time.perf_counter() - t0))
                for name, stages in WORKERS.items():
                    worker_run(draw, name, [stage() for stage in stages], requests, rows["unet f32"])
                for label, (lod_avatar, lod_fast) in lod_avatars.items():
                    # As the add-on asks while playing: each request names the pose REFRESH_FRAMES on.
                    walk_requests = [preview.PreviewRequest(lod_fast, pose, np.zeros(3, np.float32), pose.tobytes(),
                                                            viewmat, K, w, h, "flat",
                                                            lod_avatar.gaussian_config.sh_degree, True,
                                                            walk[(k + preview.REFRESH_FRAMES) % len(walk)])
                                     for k, pose in enumerate(walk)]
                    walk_full, walk_unet = [], []   # per walk frame: the full-quality layer, the float32 UNet ms
                    for request in walk_requests:
                        walk_full.append(preview.render_preview(dataclasses.replace(request, lod=False)))
                        with torch.inference_mode():
                            maps, _ = lod_fast.pose_inputs(torch.as_tensor(request.pose).reshape(1, 55, 3))
                            t4 = time.perf_counter()
                            lod_avatar.unet(maps)
                            walk_unet.append(1e3 * (time.perf_counter() - t4))
                    for name, stages in WORKERS.items():
                        worker_run(draw, label if name == "two threads" else f"{label} ({name})",
                                   [stage() for stage in stages], walk_requests, walk_unet, walk_full, look_ahead)
                    worker_run(draw, f"{label} (no look-ahead)", [stage() for stage in WORKERS["two threads"]],
                               [dataclasses.replace(r, ahead=None) for r in walk_requests], walk_unet, walk_full)
            off.free()
            self.end_result(self.begin_result(0, 0, 4, 4))

    def draw(rgba, depth):
        """Upload + draw a layer on the main thread, waiting for the GPU."""
        import gpu

        vp.draw_layer(vp.upload(rgba, depth), rig.depth_terms(proj), shift)
        gpu.state.active_framebuffer_get().read_color(0, 0, 1, 1, 4, 0, 'FLOAT')  # wait for it

    def worker_run(draw, name, stages, requests, unet_ms, full=None, main_work=None):
        """Playback through the viewport's worker: the clip's poses are submitted at PLAYBACK_FPS, as
        Blender's playback hands the draw callback a new frame, for PLAYBACK_S seconds (the clip looped);
        between ticks the main thread uploads and draws each image that lands. A pose submitted while
        the first stage is busy replaces the one waiting (latest wins). Latency: submitted -> drawn; fps:
        images drawn per second. (The pose read, timed above, runs on the main thread at each tick.)
        unet_ms: the float32 UNet ms per request; full: per request, the full-quality layer its image is
        compared with (PSNR); main_work: called on the main thread before each submit, inside the
        latency (the look-ahead, as the draw callback runs it while the worker threads are busy)."""
        worker = LatestWins(stages, name="bench-viewport")
        submitted, shown = {}, 0
        out = worker_rows[name] = {"latency": [], "unet f32": [], "psnr": []}

        def show():
            nonlocal shown
            done = worker.latest()
            if done is not None and done.seq > shown:
                shown = done.seq
                draw(*done.value)
                if done.key is not None:
                    out["latency"].append(1e3 * (time.perf_counter() - submitted[done.seq]))
                    out["unet f32"].append(unet_ms[done.key])
                    if full is not None:
                        out["psnr"].append(_box_psnr(torch, psnr, done.value[0], full[done.key][0]))

        worker.submit(None, dataclasses.replace(requests[0], pose_key=b"warm-up"))  # threads' first calls
        worker.wait(lambda w: w.finished_seq() == 1, 600)
        show()
        ticks = round(PLAYBACK_S * PLAYBACK_FPS)
        t0 = time.perf_counter()
        for tick in range(ticks):
            frame = tick % len(requests)
            t_tick = time.perf_counter()
            if main_work is not None:
                main_work(frame)
            submitted[worker.submit(frame, requests[frame])] = t_tick
            deadline = t0 + (tick + 1) / PLAYBACK_FPS
            while (left := deadline - time.perf_counter()) > 0:
                worker.wait(lambda w: w.finished_seq() > shown, left)
                show()
        worker.wait(lambda w: w.idle(), 600)
        show()
        out["elapsed"] = 1e3 * (time.perf_counter() - t0)
        out["submitted"], out["dropped"] = ticks, worker.dropped
        worker.close()

    arm.hda.enabled = False  # no compositing layer for this probe render
    scene = bpy.context.scene
    engine, size = scene.render.engine, (scene.render.resolution_x, scene.render.resolution_y)
    bpy.utils.register_class(Probe)
    scene.render.engine = "HDA_BENCH_VIEWPORT"
    scene.render.resolution_x = scene.render.resolution_y = 4
    bpy.ops.render.render()
    bpy.utils.unregister_class(Probe)
    scene.render.engine = engine
    scene.render.resolution_x, scene.render.resolution_y = size
    import gpu

    total = _median(rows["total"])
    print(f"\nviewport {width}x{height}, playback of the keyed clip at {w}x{h} ({gpu.platform.renderer_get()}): "
          f"ms per frame (median, min)")
    print("serial (every stage one after the other on the main thread, the worker's twin):")
    for key, values in rows.items():
        print(f"{key:<13} {_median(values):>8.1f} {min(values):>6.1f}")
    print(f"serial pose -> image: {_median(ratios):.2f}x the float32 UNet (median of per-frame ratios; "
          f"{total / _median(rows['unet f32']):.2f}x ratio of the medians), {1e3 / total:.1f} fps")
    hits = [preview.same_pose(fp[3], later[0]) for fp, later in zip(frame_poses, frame_poses[preview.REFRESH_FRAMES:])
            if fp[3] is not None]
    print(f"look-ahead (main thread while playing: the pose {preview.REFRESH_FRAMES} frames on, from the action's "
          f"keys): {_median(look_ms):.2f} ms median, {max(look_ms):.2f} max; predicted {sum(hits)} of "
          f"{len(frame_poses) - preview.REFRESH_FRAMES} frames (each checked against the pose Blender evaluated "
          f"there), timed on its own (not in total); the look-ahead rows below run it at every tick inside their "
          f"latency")
    print(f"worker (hda_backend.latest, latest pose wins; upload + draw on the main thread), playback at "
          f"{PLAYBACK_FPS} fps for {PLAYBACK_S:.0f} s; latency: pose submitted -> image drawn")
    print(f"{'worker':<32} {'latency ms':>10} {'min':>6} {'ratio':>6} {'fps':>6} {'drawn':>6} {'dropped':>8} "
          f"{'PSNR dB':>8} {'min':>6}")
    results = {}
    for name, out in worker_rows.items():
        latency = out["latency"]
        fps = 1e3 * len(latency) / out["elapsed"]
        lat_ratio = _median([a / b for a, b in zip(latency, out["unet f32"])])
        quality = f"{_median(out['psnr']):>8.1f} {min(out['psnr']):>6.1f}" if out["psnr"] else f"{'full':>8} {'':>6}"
        print(f"{name:<32} {_median(latency):>10.1f} {min(latency):>6.1f} {lat_ratio:>6.2f} {fps:>6.1f} "
              f"{len(latency):>6} {out['dropped']:>8} {quality}")
        results[name] = (lat_ratio, fps, _median(latency) / _median(out["unet f32"]), out["psnr"],
                         len(latency) >= out["submitted"])
    print(f"LOD: while playing, {preview.REFRESH_FRAMES - 1} frames in {preview.REFRESH_FRAMES} re-skin a UNet "
          f"output (walk at {PLAYBACK_FPS} fps; PSNR of each image drawn against its frame's full quality); with "
          f"look-ahead (the add-on, where the action predicts the pose) the UNet runs on the pose "
          f"{preview.REFRESH_FRAMES} frames on once a frame is rasterized and the frames between interpolate; "
          f"without, they carry the last output along the pose change; the still image is the full path's")
    # The add-on's worker (two threads): at full quality, and with the level of detail on every avatar
    # played (the bench avatar and each trained reference), so a miss on any of them is printed.
    for name in ["two threads"] + [n for n in results if n.startswith("LOD") and not n.endswith(")")]:
        lat_ratio, fps, of_medians, values, every = results[name]
        print(f"target ({name}): viewport pose -> image on screen <= 0.80x the float32 UNet: "
              f"{'met' if lat_ratio <= 0.8 else 'not met'} ({lat_ratio:.2f}x median of per-frame ratios of the "
              f"viewport worker's latency; {of_medians:.2f}x ratio of the medians; serial {_median(ratios):.2f}x)")
        # Playback hands over 24 poses a second, so a worker that draws every one of them shows 24 fps
        # (measured a little under: the last image lands after the last tick).
        print(f"target ({name}): >= 24 fps during playback: {'met' if fps >= 24 or every else 'not met'} "
              f"({fps:.1f} images drawn per second through the viewport worker"
              f"{', every pose of the 24 fps playback drawn' if every else ''}; serial: {1e3 / total:.1f} fps)")
    floor = preview.PSNR_LOD_FLOOR_DB
    for name in (n for n in results if n.startswith("LOD ")):
        values = results[name][3]
        print(f"quality ({name}): images drawn while playing within {floor:.0f} dB of full quality (the LOD "
              f"floor): {'met' if min(values) >= floor else 'not met'}; within the issue's 40 dB: "
              f"{'met' if min(values) >= 40 else 'not met'} (median {_median(values):.1f} dB, min "
              f"{min(values):.1f} dB); once stopped: the full path")
    _lod_by_motion(torch, np, preview, motion, psnr, lod_avatars, viewmat, K, w, h)


def _box_psnr(torch, psnr, image, full) -> float:
    """PSNR of a layer's RGBA [H,W,4] against the full-quality one inside the box the full one covers
    (``layer.covered_box``): the person's pixels (the empty rest of the frame would flatter it, more so
    the smaller the person)."""
    box = importlib.import_module(ADDON + ".hda_backend.layer").covered_box(full[..., 3])
    return float(psnr(torch.tensor(image[box]), torch.tensor(full[box])))


def _lod_by_motion(torch, np, preview, motion, psnr, lod_avatars, viewmat, K, w, h) -> None:
    """The level of detail's images on every built-in clip (24 frames, one cycle a second at 24 fps,
    played twice), serially through the add-on's pose stage at the playback size: each re-skinned image
    but the first (it has no earlier pose change to follow) against its frame's full-quality image
    (PSNR of the layer's RGBA inside the full image's box), with look-ahead (each request names the pose
    REFRESH_FRAMES frames on and follow_up runs after it, as the worker does: the add-on while playing
    an action), without it (carried along the last pose change), and re-skinned from the frame before
    as is (the code before both). The bench avatar (untrained) is left out: its output hardly depends
    on the pose."""
    floor = preview.PSNR_LOD_FLOOR_DB
    print(f"\nLOD by motion, serially through the pose stage at {w}x{h}: worst / median PSNR dB of the re-skinned "
          f"images against full quality inside its box; 'carried': without look-ahead; 'as is': the output of the "
          f"frame before, re-skinned unchanged")
    print(f"{'avatar':<12} {'motion':<13} {'look-ahead':>13} {'carried':>13} {'as is':>13}  {floor:.0f} dB")
    met = met_carried = 0
    rows = [(label, clip) for label in lod_avatars if label != "LOD" for clip in motion.BUILTIN]
    for label, clip in rows:
        avatar, fast = lod_avatars[label]
        poses = motion.procedural(clip, PLAYBACK_FPS, float(PLAYBACK_FPS)).poses.reshape(PLAYBACK_FPS, -1).numpy()
        n = len(poses)
        requests = [preview.PreviewRequest(fast, pose, np.zeros(3, np.float32), pose.tobytes(), viewmat, K, w, h,
                                           "flat", avatar.gaussian_config.sh_degree, True,
                                           poses[(k + preview.REFRESH_FRAMES) % n]) for k, pose in enumerate(poses)]
        scores = {"look-ahead": [], "carried": [], "as is": []}
        with torch.inference_mode():
            raws = [fast.raw_output(r.pose)[0] for r in requests]
            # The full path's image from the same UNet outputs (skin of a pose's own output is the full
            # path bit for bit: tests/test_realtime.py), not a second UNet run per frame.
            full = [preview.raster_stage((r, fast.skin(raw, r.pose, r.transl)))[0] for r, raw in zip(requests, raws)]
            for name, ahead in (("look-ahead", True), ("carried", False)):
                stage = preview.PoseStage()
                for i in range(2 * n):
                    k = i % n
                    request = requests[k] if ahead else dataclasses.replace(requests[k], ahead=None)
                    posed = stage(request)
                    stage.follow_up()
                    if i % preview.REFRESH_FRAMES and i > 1:  # re-skinned, after the first (as is: no history)
                        scores[name].append(_box_psnr(torch, psnr, preview.raster_stage(posed)[0], full[k]))
                        if not ahead:
                            g = fast.skin(raws[k - 1], requests[k].pose, requests[k].transl)
                            scores["as is"].append(_box_psnr(torch, psnr, preview.raster_stage((requests[k], g))[0],
                                                             full[k]))
        ok = min(scores["look-ahead"]) >= floor
        met += ok
        met_carried += min(scores["carried"]) >= floor
        print(f"{label[4:]:<12} {clip:<13} "
              + " ".join(f"{min(v):>6.1f} / {_median(v):<5.1f}" for v in scores.values())
              + f" {'met' if ok else 'not met'}")
    print(f"quality (LOD by motion): images drawn while playing within {floor:.0f} dB of full quality on {met} "
          f"of {len(rows)} avatar-motion pairs with look-ahead, {met_carried} without")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=("tiny", "cpu", "paper"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--zip", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zip:
        _child(args)
        return 0
    return run_with_built_zip(__file__, ["--preset", args.preset, "--size", str(args.size),
                                         "--frames", str(args.frames)])


if __name__ == "__main__":
    sys.exit(main())
