#!/usr/bin/env python3
"""The README's picture of a person in the scene's light: a sun, a ground plane and one sampled person
mid-stride, whose shadow on the ground comes from the avatar's proxy (a shadow-only caster by default).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/lit_scene.py [--out docs/lit_scene.png] [--size 384x256]

Real Blender (bpy), headless: the extension zip built from this checkout is installed into a temporary
user folder; the scene is made with the extension's operators (Add Avatar, Sample Identity from the
bundled model, Import Motion of the built-in walk), nothing else set on the proxy, and rendered with
Cycles (16 samples, denoised) through the compositor that lays the person over the render. The frame
is written as an 8-bit PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from build_extension import build_or_report  # scripts/ is sys.path[0] when a script runs

REPO = Path(__file__).resolve().parent.parent
FRAMES = 24     # one walk cycle
FRAME = 9       # mid-stride


def _child(args) -> None:
    import bpy
    from mathutils import Vector

    bpy.ops.extensions.package_install_files(filepath=args["zip"], repo="user_default", enable_on_install=True)
    scene = bpy.context.scene
    for obj in list(bpy.data.objects):      # the start-up scene's cube, light and camera
        bpy.data.objects.remove(obj)
    scene.render.engine = 'CYCLES'
    scene.cycles.device, scene.cycles.samples, scene.cycles.seed = 'CPU', 16, 0
    scene.cycles.use_denoising = True
    scene.render.resolution_x, scene.render.resolution_y = args["size"]
    scene.render.resolution_percentage = 100
    scene.render.fps = 24
    scene.view_settings.view_transform = 'Standard'
    scene.render.image_settings.file_format = 'PNG'
    scene.render.image_settings.color_mode = 'RGB'

    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    cam.location = Vector((2.4, -4.6, 1.5))
    cam.rotation_euler = (Vector((0.0, 0.0, 0.85)) - cam.location).to_track_quat('-Z', 'Y').to_euler()
    cam.data.lens = 40.0
    scene.camera = cam
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", 'SUN'))
    scene.collection.objects.link(sun)
    sun.data.energy, sun.data.angle = 3.0, math.radians(3.0)
    sun.rotation_euler = (math.radians(50), 0.0, math.radians(-60))
    world = bpy.data.worlds.new("Sky")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.42, 0.52, 0.68, 1.0)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.5
    scene.world = world
    bpy.ops.mesh.primitive_plane_add(size=30.0, location=(0, 0, 0))
    ground = bpy.data.materials.new("Ground")
    ground.use_nodes = True
    ground.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = (0.45, 0.42, 0.38, 1.0)
    bpy.context.active_object.data.materials.append(ground)

    bpy.ops.hda.add_avatar(seed=0)
    arm = bpy.context.active_object
    arm.rotation_euler = (0.0, 0.0, math.radians(-30))
    bpy.ops.hda.sample_identity(model=args["model"])
    bpy.ops.hda.import_motion(filepath=args["motion"], fps_mode='SCENE_FPS', frame_start=1, set_frame_range=True)
    scene.frame_set(FRAME)
    scene.render.filepath = args["out"]
    bpy.ops.render.render(write_still=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "lit_scene.png"))
    parser.add_argument("--size", default="384x256")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    import numpy as np

    from hda_backend.motion import procedural

    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = build_or_report(Path(tmp))
        if zip_path is None:
            return 1
        clip = procedural("walk", frames=FRAMES, fps=24.0)
        motion = Path(tmp) / "walk.npz"
        np.savez(motion, poses=clip.poses.reshape(FRAMES, -1).numpy(), trans=clip.transl.numpy(),
                 mocap_frame_rate=np.float64(24.0))
        child = {"zip": str(next(Path(tmp).glob("*.zip"))), "out": str(Path(args.out).resolve()),
                 "size": [width, height], "motion": str(motion),
                 "model": str(REPO / "assets" / "default" / "diffusion.safetensors")}
        env = dict(os.environ, BLENDER_USER_RESOURCES=str(Path(tmp) / "user"), OMP_WAIT_POLICY="PASSIVE")
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(child)], env=env)
        if proc.returncode != 0:
            return proc.returncode
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
