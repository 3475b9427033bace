#!/usr/bin/env python3
"""Benchmark of the Blender periphery (prints figures, asserts nothing): bulk motion import against
per-key inserts, the viewport's per-stage milliseconds at 1280x720 with the ``cpu`` preset, and the
texture upload + draw of a layer in a GPU context (software GL here).

    .venv/bin/python scripts/build_extension.py --output-dir /tmp/hda_dist
    BLENDER_USER_RESOURCES=$(mktemp -d) OMP_WAIT_POLICY=PASSIVE \\
        .venv/bin/python scripts/bench_periphery.py /tmp/hda_dist/hda_avatars-0.1.0.zip

Runs in real Blender (bpy), in background mode; the GPU part runs inside a RenderEngine with
``bl_use_gpu_context`` (the only place background Blender lends Python a GPU context).
"""

import importlib
import os
import sys
import tempfile
import time

import numpy as np

ADDON = "bl_ext.user_default.hda_avatars"
WIDTH, HEIGHT = 1280, 720


def timed(fn, n=5):
    """(median, min) milliseconds of n calls."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return sorted(times)[n // 2], min(times)


def main(zip_path: str) -> None:
    import bpy

    tmp = tempfile.mkdtemp(prefix="hda_bench_")
    bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    vp = importlib.import_module(ADDON + ".blender_addon.viewport")
    rig = importlib.import_module(ADDON + ".hda_backend.rig")
    motion_op = importlib.import_module(ADDON + ".operators.motion")
    scene = bpy.context.scene
    scene.render.fps = 30
    bpy.ops.hda.add_avatar()
    obj = bpy.context.active_object
    obj.hda.uv_preset = "cpu"

    frames = 2400
    rng = np.random.default_rng(0)
    clip = os.path.join(tmp, "clip.npz")
    np.savez(clip, poses=rng.normal(0, 0.2, (frames, 165)), trans=rng.normal(0, 0.1, (frames, 3)),
             mocap_frame_rate=np.array(120.0))
    for mode in ("RESAMPLE", "SCENE_FPS"):
        t = time.perf_counter()
        bpy.ops.hda.import_motion(filepath=clip, fps_mode=mode, frame_start=1)
        dt = time.perf_counter() - t
        playback = importlib.import_module(ADDON + ".blender_addon.playback")
        keys = sum(len(fc.keyframe_points) for fc in playback.object_fcurves(obj))
        print(f"import_motion {frames} frames at 120 fps, {mode}: {keys} keys in {dt:.2f} s "
              f"({keys / dt / 1e3:.0f}k keys/s, parsing and conversion included)")
    obj.animation_data_clear()
    t = time.perf_counter()
    for f in range(100):
        for pb in obj.pose.bones:
            pb.keyframe_insert("rotation_quaternion", frame=f + 1)
    dt = time.perf_counter() - t
    print(f"keyframe_insert, one call per bone and frame: {100 * 55 * 4} keys in {dt:.2f} s "
          f"({100 * 55 * 4 / dt / 1e3:.0f}k keys/s)")

    obj.animation_data_clear()
    bpy.ops.hda.import_motion(filepath=clip, frame_start=1)
    scene.frame_set(10)
    cam = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))
    scene.collection.objects.link(cam)
    cam.location, cam.rotation_euler = (0.5, -4.0, 1.2), (1.45, 0.0, 0.1)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    proj = np.array(cam.calc_matrix_camera(depsgraph, x=WIDTH, y=HEIGHT))
    view = np.linalg.inv(np.array(cam.matrix_world))
    preview = importlib.import_module(ADDON + ".hda_backend.preview")
    posed = vp.read_pose(obj, depsgraph)
    request, _ = vp.request_for(obj, depsgraph, posed, view, proj, WIDTH, HEIGHT)
    g = preview.PoseStage()(request)[1]  # warm-up: numba JIT, UV layout, caches

    print("pose -> UNet -> Gaussians (cpu preset, %d Gaussians): median %.1f ms, min %.1f ms"
          % ((g.means.shape[0],) + timed(lambda: preview.PoseStage()(request))))
    layers = {}
    for moving in (False, True):
        w, h = vp.render_size(WIDTH, HEIGHT, moving)
        request, shift = vp.request_for(obj, depsgraph, posed, view, proj, w, h)
        layers[(w, h)] = preview.raster_stage((request, g)) + (shift,)
        print("rasterize + layer %dx%d: median %.1f ms, min %.1f ms"
              % ((w, h) + timed(lambda: preview.raster_stage((request, g)))))

    class Probe(bpy.types.RenderEngine):
        bl_idname = "HDA_BENCH_GPU"
        bl_label = "HDA bench"
        bl_use_gpu_context = True

        def render(self, depsgraph):
            import gpu

            for (w, h), (rgba, depth, shift) in layers.items():
                off = gpu.types.GPUOffScreen(WIDTH, HEIGHT, format='RGBA16F')
                with off.bind():
                    def upload_and_draw():
                        vp.draw_layer(vp.upload(rgba, depth), rig.depth_terms(proj), shift)
                        gpu.state.active_framebuffer_get().read_color(0, 0, 1, 1, 4, 0, 'FLOAT')  # wait for it
                    upload_and_draw()
                    print("upload + draw %dx%d (%s): median %.1f ms, min %.1f ms"
                          % ((w, h, gpu.platform.renderer_get()) + timed(upload_and_draw)))
                off.free()
            result = self.begin_result(0, 0, 4, 4)
            self.end_result(result)

    obj.hda.enabled = False  # no compositing layer for this probe render
    bpy.utils.register_class(Probe)
    scene.render.engine = "HDA_BENCH_GPU"
    scene.render.resolution_x = scene.render.resolution_y = 4
    bpy.ops.render.render()
    bpy.utils.unregister_class(Probe)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
