#!/usr/bin/env python3
"""The stall of the first avatar render after installing the extension, without and with the kernel
warm-up the add-on runs when it is enabled (blender_addon/kernels.py). This is a benchmark, not a test.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/bench_first_render.py [--size 256]

Real Blender (bpy), the extension zip built from this checkout and installed into fresh temporary
user folders (numba's cache lives beside the installed kernels, as for a user):

- cold: install, then render two frames of an avatar through the frame handler's path
  (``layers.write_frame``); the first one compiles the raster kernels;
- warm-up: install into another folder and run the add-on's background compile (the child process
  its enable timer starts), timed;
- after: a new Blender process with that installed extension renders the same two frames.

torch's import and the avatar's load happen before the clock starts; the figures are the first and
second frame's seconds and the stall (first minus second) of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from build_extension import build_or_report  # scripts/ is sys.path[0] when a script runs

REPO = Path(__file__).resolve().parent.parent
ADDON = "bl_ext.user_default.hda_avatars"


def _child(args) -> None:
    import bpy

    if args.phase in ("cold", "warmup"):
        bpy.ops.extensions.package_install_files(filepath=args.zip, repo="user_default", enable_on_install=True)
    else:
        bpy.ops.preferences.addon_enable(module=ADDON)
    if args.phase == "warmup":
        deps = sys.modules[ADDON + ".blender_addon.deps"]
        kernels = sys.modules[ADDON + ".blender_addon.kernels"]
        paths = sys.modules[ADDON + ".blender_addon.paths"]
        argv, env = kernels.command(sys.path, paths.EXT_ROOT, os.path.join(paths.user_dir("kernels"), kernels.STAMP_NAME))
        t0 = time.perf_counter()
        job = deps.Job(argv, env=env, describe=kernels.describe).start()
        state = job.wait(timeout=1200)
        print(json.dumps({"warmup_s": time.perf_counter() - t0, "state": state}))
        return
    layers = sys.modules[ADDON + ".blender_addon.layers"]
    runtime = sys.modules[ADDON + ".blender_addon.runtime"]
    scene = bpy.context.scene
    scene.render.resolution_x = scene.render.resolution_y = args.size
    scene.render.resolution_percentage = 100
    scene.camera.location, scene.camera.rotation_euler = (0.0, -4.2, 1.0), (1.5708, 0.0, 0.0)
    bpy.ops.hda.add_avatar(seed=0)
    arm = bpy.context.active_object
    runtime.get_avatar(arm)                  # torch imported, the UNet built: not part of the stall
    times = []
    for frame in (1, 2):
        arm.pose.bones["left_elbow"].rotation_quaternion = (0.9, 0.1 * frame, 0.0, 0.0)
        scene.frame_set(frame)
        t0 = time.perf_counter()
        layers.write_frame(arm, scene, bpy.context.evaluated_depsgraph_get(), frame)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"first_s": times[0], "second_s": times[1]}))


def _run(args, phase: str, user: Path, zip_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    env.update(BLENDER_USER_RESOURCES=str(user), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--phase", phase, "--zip", str(zip_path)],
                          env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench_first_render: {phase} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--phase", choices=("cold", "warmup", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--zip", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        _child(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = build_or_report(Path(tmp))
        if zip_path is None:
            return 1
        cold = _run(args, "cold", Path(tmp) / "user_cold", zip_path)
        warm = _run(args, "warmup", Path(tmp) / "user_warm", zip_path)
        after = _run(args, "after", Path(tmp) / "user_warm", zip_path)
    print(f"avatar render at {args.size}x{args.size}, first and second frame after installing (s):")
    print(f"  without warm-up: first {cold['first_s']:.2f}, second {cold['second_s']:.2f}, "
          f"stall {cold['first_s'] - cold['second_s']:.2f}")
    print(f"  background warm-up at enable: {warm['warmup_s']:.1f} s ({warm['state']})")
    print(f"  after the warm-up:  first {after['first_s']:.2f}, second {after['second_s']:.2f}, "
          f"stall {after['first_s'] - after['second_s']:.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other jobs inflate these figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
