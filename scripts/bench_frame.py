#!/usr/bin/env python3
"""Per-frame milliseconds of an avatar in Blender: pose read -> UNet -> Gaussians -> image -> layer file.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_frame.py [--preset cpu] [--size 512] [--frames 20]

Runs real Blender (bpy): builds and installs the extension into a temporary user folder, adds an
avatar, keys a different random pose on every frame, then for each frame times the stages the
final-render handler runs (blender_addon.layers.write_frame), called one by one:

    pose      read the evaluated armature (pose_bone.matrix of 55 bones) and the camera -> SMPL-X pose
    maps      UV pose maps: the mean template posed by LBS, normals, texel interpolation
    unet      the avatar UNet
    gaussians texel gather, skinning transforms, decoding (paper Eq. 7)
    raster    the Gaussian rasterizer, RGB + expected depth
    glue      linear premultiplied layer + EXR encoding and atomic write

and, as a check, the whole handler path end to end (runtime.render_avatar + the file, frame cache off).
Prints median and minimum per stage. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ADDON = "bl_ext.user_default.hda_avatars"


def _child(args) -> None:
    import bpy
    import numpy as np
    import torch

    bpy.ops.extensions.package_install_files(filepath=args.zip, repo="user_default", enable_on_install=True)
    runtime = sys.modules[ADDON + ".blender_addon.runtime"]
    layers = sys.modules[ADDON + ".blender_addon.layers"]
    session = sys.modules[ADDON + ".blender_addon.session"]
    rig = importlib.import_module(ADDON + ".hda_backend.rig")
    gaussians = importlib.import_module(ADDON + ".hda_backend.avatar.gaussians")
    uvmap = importlib.import_module(ADDON + ".hda_backend.uvmap")
    frames_mod = importlib.import_module(ADDON + ".hda_backend.render.frames")
    exr = importlib.import_module(ADDON + ".hda_backend.exr")

    scene = bpy.context.scene
    scene.render.resolution_x = scene.render.resolution_y = args.size
    scene.render.resolution_percentage = 100
    scene.camera.location, scene.camera.rotation_euler = (0.0, -4.2, 1.0), (1.5708, 0.0, 0.0)
    bpy.ops.hda.add_avatar(seed=0)
    arm = bpy.context.active_object
    arm.hda.uv_preset = args.preset
    arm.hda.shading = 'FLAT'
    avatar = runtime.get_avatar(arm)
    layout = runtime.get_layout(avatar.body)
    rng = np.random.default_rng(0)
    poses = rng.normal(0, 0.2, (args.frames, 165))
    quats, root = rig.bone_rotations_from_pose(poses, np.zeros((args.frames, 3)), layout)
    for f in range(args.frames):
        for j, name in enumerate(layout.names):
            arm.pose.bones[name].rotation_quaternion = quats[f, j].tolist()
            arm.pose.bones[name].keyframe_insert("rotation_quaternion", frame=f + 1)
    out = Path(tempfile.mkdtemp()) / "layer.exr"
    stages = {k: [] for k in ("pose", "maps", "unet", "gaussians", "raster", "glue", "sum", "handler")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, preset {args.preset} (UV {avatar.uv_res}, "
          f"{avatar.num_gaussians} Gaussians), image {args.size}x{args.size}")
    w, h = layers.render_size(scene)
    for f in range(-2, args.frames):  # two warm-up frames (numba and oneDNN first calls)
        scene.frame_set(max(f, 0) + 1)
        dg = bpy.context.evaluated_depsgraph_get()
        with torch.inference_mode():
            t0 = time.perf_counter()
            pose, transl = runtime.read_pose(arm, dg, layout)
            viewmat, K = runtime.camera_matrices(arm, dg, scene.camera, w, h)
            pose_t = torch.as_tensor(pose, dtype=torch.float32).reshape(1, 55, 3)
            transl_t = torch.as_tensor(transl, dtype=torch.float32).reshape(1, 3)
            t1 = time.perf_counter()
            maps, posed = avatar.pose_inputs(pose_t)
            t2 = time.perf_counter()
            raw_map = avatar.unet(maps)
            t3 = time.perf_counter()
            raw = gaussians.gather_texels(raw_map, avatar.binding)
            transforms = uvmap.global_transform(avatar.body, pose_t, transl_t)[:, None] @ posed.transforms
            g = gaussians.decode(raw, avatar.binding, posed.rest_vertices, transforms, avatar.gaussian_config).index(0)
            t4 = time.perf_counter()
            img, alpha = frames_mod.render_gaussians(g, torch.as_tensor(viewmat, dtype=torch.float32),
                                                     torch.as_tensor(K, dtype=torch.float32), w, h,
                                                     render_mode="RGB+ED")
            img, alpha = img.numpy(), alpha[..., 0].numpy()
            t5 = time.perf_counter()
            rgba, depth = runtime.to_layer(img[..., :3], alpha, img[..., 3])
            exr.write_exr(out, exr.layer_channels(rgba, depth))
            t6 = time.perf_counter()
        session.caches.frames.clear()
        session.caches.frame_bytes = 0  # the handler path below must render, not hit the cache
        t7 = time.perf_counter()
        layers.write_frame(arm, scene, dg, f + 100)
        t8 = time.perf_counter()
        if f < 0:
            continue
        for key, value in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0, t8 - t7)):
            stages[key].append(1e3 * value)
    print(f"{'stage':<10} {'median ms':>10} {'min ms':>8}")
    for key, values in stages.items():
        print(f"{key:<10} {statistics.median(values):>10.1f} {min(values):>8.1f}")
    load = os.getloadavg()[0]
    print(f"{args.frames} frames; load average {load:.1f} on {os.cpu_count()} CPUs (other jobs inflate these figures)")


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
    with tempfile.TemporaryDirectory() as tmp:
        build = subprocess.run([sys.executable, str(REPO / "scripts" / "build_extension.py"), "--output-dir", tmp],
                               capture_output=True, text=True)
        if build.returncode != 0:
            print(build.stdout + build.stderr, file=sys.stderr)
            return 1
        env = dict(os.environ, BLENDER_USER_RESOURCES=str(Path(tmp) / "user"), OMP_WAIT_POLICY="PASSIVE")
        zip_path = next(Path(tmp).glob("*.zip"))
        cmd = [sys.executable, __file__, "--preset", args.preset, "--size", str(args.size),
               "--frames", str(args.frames), "--zip", str(zip_path)]
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
