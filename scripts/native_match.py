"""Blender 5.3's native Gaussian splats against the backend rasterizer: match PSNR and ms per frame.

Run with bpy 5.3 (``.venv-bpy53``), from outside the repository (bpy must not see a local module
shadowing the standard library):

    cd / && PYTHONPATH=$REPO OMP_WAIT_POLICY=PASSIVE $REPO/.venv-bpy53/bin/python $REPO/scripts/native_match.py \\
        --avatar $REPO/assets/default/references/subject_000.hda.safetensors --size 512 --samples 128

The avatar stands in its rest pose in front of a perspective camera; both renders use the Standard view
transform over white. Printed: PSNR on the avatar's pixels (every pixel either render covers with
alpha > 0.05, in display values) and on their bounding box, for the plain conversion and for the one
that bakes the rasterizer's screen-space dilation into the scales; the Cycles render time per frame,
and the backend's (avatar + raster: what the compositing path adds to Blender's own render of the scene)
for comparison. A measurement, not a test.
"""

import argparse
import time

import bpy
import numpy as np
import torch

from hda_backend import rig
from hda_backend.avatar.io import load_avatar
from hda_backend.layer import srgb_to_linear
from hda_backend.body import load_body
from hda_backend.native_splats import ATTRIBUTES, camera_dilation, splat_arrays
from hda_backend.render.frames import render_gaussians


def linear_to_srgb(x):
    x = np.clip(x, 0, 1)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def psnr(a, b):
    return 10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--avatar", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--engine", default="CYCLES", choices=("CYCLES", "BLENDER_EEVEE"))
    args = ap.parse_args()
    w = h = args.size
    body = load_body()
    avatar = load_avatar(args.avatar, body).eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        g = avatar(torch.zeros(1, 165), torch.zeros(1, 3)).index(0)
        t_avatar = time.perf_counter() - t0

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    cloud = bpy.data.pointclouds.new("avatar")
    cloud.type = 'GAUSSIAN_SPLAT'
    cloud.resize(g.means.shape[0])
    obj = bpy.data.objects.new("avatar", cloud)
    scene.collection.objects.link(obj)
    cam = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    cam.location = (0.5, -2.6, 0.0)
    cam.rotation_euler = (np.radians(90), 0, np.radians(11))
    scene.render.engine = args.engine
    if args.engine == 'CYCLES':
        scene.cycles.samples, scene.cycles.device, scene.cycles.use_denoising = args.samples, 'CPU', False
    scene.render.resolution_x, scene.render.resolution_y = w, h
    scene.render.film_transparent = True
    scene.view_settings.view_transform = 'Standard'
    scene.render.image_settings.file_format = 'OPEN_EXR'
    scene.render.image_settings.color_depth = '32'
    scene.render.filepath = bpy.app.tempdir + "native.exr"
    dg = bpy.context.evaluated_depsgraph_get()
    proj = cam.evaluated_get(dg).calc_matrix_camera(dg, x=w, y=h)
    viewmat, K = rig.camera_from_blender(np.array(cam.matrix_world), np.array(proj), w, h, np.eye(4))

    with torch.no_grad():
        for _ in range(2):  # the first call compiles the numba rasterizer: time the second
            t0 = time.perf_counter()
            out, alpha = render_gaussians(g, torch.as_tensor(viewmat, dtype=torch.float32),
                                          torch.as_tensor(K, dtype=torch.float32), w, h)
            t_raster = time.perf_counter() - t0
    a_b = np.clip(alpha[..., 0].numpy(), 0, 1)
    lin_b = srgb_to_linear(np.clip(out.numpy() / np.maximum(a_b, 1e-6)[..., None], 0, 1)) * a_b[..., None]
    disp_b = linear_to_srgb(lin_b + (1 - a_b[..., None]))
    print(f"backend: avatar {1e3 * t_avatar:.0f} ms + raster {1e3 * t_raster:.0f} ms at {w}x{h}")

    for label, dilation in (("plain", None), ("dilated", camera_dilation(g.means, viewmat, K))):
        t0 = time.perf_counter()
        arrays = splat_arrays(g, rig.body_to_world(np.eye(4)), dilation=dilation)
        for name, kind, key in ATTRIBUTES:
            attribute = cloud.attributes.get(name) or cloud.attributes.new(name, kind, 'POINT')
            attribute.data.foreach_set(key, arrays[name].ravel())
        obj.update_tag(refresh={'DATA'})
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        bpy.ops.render.render(write_still=True)
        t_render = time.perf_counter() - t0
        img = bpy.data.images.load(scene.render.filepath, check_existing=False)
        px = np.empty(w * h * 4, np.float32)
        img.pixels.foreach_get(px)
        bpy.data.images.remove(img)
        px = px.reshape(h, w, 4)[::-1]
        disp_n = linear_to_srgb(px[..., :3] + (1 - px[..., 3:4]))
        mask = np.maximum(a_b, px[..., 3]) > 0.05
        ys, xs = np.nonzero(mask)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        print(f"{label}: PSNR avatar pixels {psnr(disp_b[mask], disp_n[mask]):.2f} dB ({mask.sum()} px), "
              f"box {psnr(disp_b[box], disp_n[box]):.2f} dB; alpha sum backend {a_b.sum():.0f} native "
              f"{px[..., 3].sum():.0f}; convert+write {1e3 * t_write:.0f} ms, {args.engine} "
              f"{args.samples if args.engine == 'CYCLES' else ''} {1e3 * t_render:.0f} ms")


main()
