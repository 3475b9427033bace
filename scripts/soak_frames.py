#!/usr/bin/env python3
"""Memory and frame-cache hits over a long animation, in real Blender (bpy): a soak test of the
per-frame path, with figures printed. This is a benchmark, not a test.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/soak_frames.py [--frames 1000] [--size 48] [--cache-mb 256]

Builds and installs the extension into a temporary user folder, adds an avatar (tiny preset) whose
pose is keyed every 10 frames (every frame in between is a new pose), then steps through the frames
the way a render does: for each frame, ``frame_set`` and the frame handler's work
(``layers.update_scene``: pose read, render or frame-cache hit, layer file, image reload). It prints
the process's resident memory (RSS, /proc) at frame 100 and at the last frame and the growth between
them, then scrubs back over the last 100 frames, as an animator does, and prints the frame cache's
hits and misses for each pass. ``--cache-mb`` sets the Frame Cache preference (0: off).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from build_extension import run_with_built_zip  # scripts/ is sys.path[0] when a script runs

REPO = Path(__file__).resolve().parent.parent
ADDON = "bl_ext.user_default.hda_avatars"
KEY_STEP = 10        # frames between pose keys


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(args) -> None:
    import bpy
    import numpy as np

    bpy.ops.extensions.package_install_files(filepath=args.zip, repo="user_default", enable_on_install=True)
    bpy.context.preferences.addons[ADDON].preferences.frame_cache_mb = args.cache_mb
    layers = sys.modules[ADDON + ".blender_addon.layers"]
    runtime = sys.modules[ADDON + ".blender_addon.runtime"]
    session = sys.modules[ADDON + ".blender_addon.session"]
    rig = sys.modules[ADDON + ".hda_backend.rig"] if ADDON + ".hda_backend.rig" in sys.modules else None
    if rig is None:
        import importlib
        rig = importlib.import_module(ADDON + ".hda_backend.rig")

    scene = bpy.context.scene
    scene.render.resolution_x = scene.render.resolution_y = args.size
    scene.render.resolution_percentage = 100
    scene.frame_start, scene.frame_end = 1, args.frames
    scene.camera.location, scene.camera.rotation_euler = (0.0, -4.2, 1.0), (math.pi / 2, 0.0, 0.0)
    bpy.ops.hda.add_avatar(seed=0)
    arm = bpy.context.active_object
    arm.hda.uv_preset = 'tiny'
    layout = runtime.get_layout(runtime.get_avatar(arm).body)
    keys = list(range(1, args.frames + 1, KEY_STEP)) + [args.frames]
    poses = np.random.default_rng(0).normal(0, 0.25, (len(keys), 165))
    quats, _ = rig.bone_rotations_from_pose(poses, np.zeros((len(keys), 3)), layout)
    for i, frame in enumerate(keys):
        for j, name in enumerate(layout.names):
            arm.pose.bones[name].rotation_quaternion = quats[i, j].tolist()
            arm.pose.bones[name].keyframe_insert("rotation_quaternion", frame=frame)

    stats = session.caches.stats

    def step(frames):
        before = dict(stats)
        for frame in frames:
            scene.frame_set(frame)
            failures, _notes = layers.update_scene(scene, bpy.context.evaluated_depsgraph_get())
            if failures:
                raise SystemExit(f"soak: frame {frame}: {failures[0]}")
            if frame == 100:
                marks["100"] = rss_mb()
        return stats["hits"] - before["hits"], stats["misses"] - before["misses"]

    marks = {}
    print(f"bpy {bpy.app.version_string}, {args.frames} frames at {args.size}x{args.size}, tiny preset, "
          f"frame cache {args.cache_mb} MB" + (" (off)" if args.cache_mb == 0 else ""))
    print(f"RSS after set-up: {rss_mb():.0f} MB")
    hits, misses = step(range(1, args.frames + 1))
    marks["end"] = rss_mb()
    growth = 100 * (marks["end"] - marks["100"]) / marks["100"]
    print(f"forward pass: {hits} hits, {misses} misses; cache {session.caches.frame_bytes / 2**20:.1f} MB in "
          f"{len(session.caches.frames)} frames")
    print(f"RSS at frame 100: {marks['100']:.0f} MB, at frame {args.frames}: {marks['end']:.0f} MB, "
          f"growth {growth:+.1f} %")
    back = range(args.frames, max(0, args.frames - 100), -1)
    hits, misses = step(back)
    print(f"scrub back over the last {len(back)} frames: {hits} hits, {misses} misses; RSS {rss_mb():.0f} MB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--cache-mb", type=int, default=256)
    parser.add_argument("--zip", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.frames < 200:
        parser.error("--frames must be at least 200 (RSS is compared between frame 100 and the last)")
    if args.zip:
        _child(args)
        return 0
    return run_with_built_zip(__file__, ["--frames", str(args.frames), "--size", str(args.size),
                                         "--cache-mb", str(args.cache_mb)])


if __name__ == "__main__":
    sys.exit(main())
