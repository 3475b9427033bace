"""Do Blender 5.3's native Gaussian splats cast shadows, and do they receive light? Small renders.

    cd / && PYTHONPATH=$REPO $REPO/.venv-bpy53/bin/python $REPO/scripts/native_shadows.py CYCLES
    (or BLENDER_EEVEE)

A blob of 400 opaque splats (SH DC 0: colour 0.5) floats 0.8 m over a plane, lit by a sun at 45°.
Printed: how much of the plane *outside the blob's own pixels* darkens when the blob is shown (its
shadow), the blob's colour with the sun on and off (does it receive light), and the plane's
brightness with the sun off (does the splats' radiance light the scene). A measurement, not a test.
"""

import sys

import bpy
import numpy as np

SIZE = 64


def main(engine: str) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    bpy.ops.mesh.primitive_plane_add(size=6, location=(0, 0, 0))
    plane = bpy.context.active_object
    rng = np.random.default_rng(0)
    n = 400
    cloud = bpy.data.pointclouds.new("blob")
    cloud.type = 'GAUSSIAN_SPLAT'
    cloud.resize(n)
    blob = bpy.data.objects.new("blob", cloud)
    scene.collection.objects.link(blob)
    values = {"position": ('FLOAT_VECTOR', "vector", rng.uniform(-0.3, 0.3, (n, 3)) + [0, 0, 0.8]),
              "scale": ('FLOAT_VECTOR', "vector", np.full((n, 3), 0.12)),
              "rotation": ('QUATERNION', "value", np.tile([1.0, 0, 0, 0], (n, 1))),
              "radiance:base": ('FLOAT4', "vector", np.tile([0.0, 0.0, 0.0, 0.99], (n, 1)))}
    for name, (kind, key, array) in values.items():
        attribute = cloud.attributes.get(name) or cloud.attributes.new(name, kind, 'POINT')  # position exists
        attribute.data.foreach_set(key, np.ascontiguousarray(array, np.float32).ravel())
    sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", 'SUN'))
    scene.collection.objects.link(sun)
    sun.data.energy = 3.0
    sun.rotation_euler = (0, np.radians(45), 0)
    cam = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    cam.location = (0, -4, 4)
    cam.rotation_euler = (np.radians(45), 0, 0)
    scene.world = bpy.data.worlds.new("black")
    scene.world.color = (0, 0, 0)
    scene.render.engine = engine
    if engine == 'CYCLES':
        scene.cycles.samples, scene.cycles.device, scene.cycles.use_denoising = 16, 'CPU', False
    else:
        scene.eevee.taa_render_samples = 4
    scene.render.resolution_x = scene.render.resolution_y = SIZE
    scene.view_settings.view_transform = 'Standard'
    scene.render.image_settings.file_format = 'OPEN_EXR'
    scene.render.image_settings.color_depth = '32'

    def shot():
        scene.render.filepath = bpy.app.tempdir + "shot.exr"
        bpy.ops.render.render(write_still=True)
        img = bpy.data.images.load(scene.render.filepath, check_existing=False)
        px = np.empty(SIZE * SIZE * 4, np.float32)
        img.pixels.foreach_get(px)
        bpy.data.images.remove(img)
        return px.reshape(SIZE, SIZE, 4)

    plane.hide_render, scene.render.film_transparent = True, True
    alpha = shot()[..., 3]
    plane.hide_render, scene.render.film_transparent = False, False
    lit = shot()
    blob.hide_render = True
    without = shot()
    blob.hide_render, sun.data.energy = False, 0.0
    dark = shot()
    outside, core = alpha < 0.01, alpha > 0.995
    darker = (without[..., :3] - lit[..., :3]).mean(-1)[outside]
    print(f"{engine}: shadow: {int((darker > 0.05).sum())} of {int(outside.sum())} plane pixels outside the blob "
          f"darken by > 0.05 (max {darker.max():.3f})")
    print(f"{engine}: blob colour sun on {lit[core][:, :3].mean():.4f}, sun off {dark[core][:, :3].mean():.4f} "
          f"(srgb_to_linear(0.5) = 0.2140)")
    print(f"{engine}: sun off, plane outside the blob: mean {dark[..., :3].mean(-1)[outside].mean():.4f}, "
          f"max {dark[..., :3].mean(-1)[outside].max():.4f}")


main(sys.argv[-1])
