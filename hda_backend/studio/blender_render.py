"""The Blender side of the capture studio, run as its own process:

    python -m hda_backend.studio.blender_render WORK_DIR

WORK_DIR holds ``scene.json`` (render settings, cameras, lights, materials, which images to render
and where) and ``scene.npz`` (faces, rest coordinates and per-frame vertices of every mesh), written by
:mod:`hda_backend.studio.synth`. This process imports only bpy, numpy, Pillow and the numpy-only
:mod:`hda_backend.layer` and :mod:`hda_backend.atomic` (never torch). For each frame it moves the meshes,
then renders every camera that still lacks its image with Cycles on the CPU, and writes
``images/<cam>/<frame>.png`` (RGB over the background colour) and ``masks/<cam>/<frame>.png`` (the
render's alpha) atomically, mask first. After each pair it prints ``HDA-DONE <cam> <frame>`` so the
parent can drive a progress bar.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from hda_backend.atomic import replacing
from hda_backend.layer import srgb_to_linear


def save_png_atomic(path: Path, array: np.ndarray) -> None:
    with replacing(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


# --- materials -----------------------------------------------------------------------------------------

class _Nodes:
    def __init__(self, material):
        self.tree = material.node_tree
        self.nodes, self.links = self.tree.nodes, self.tree.links

    def new(self, kind, **props):
        node = self.nodes.new(kind)
        for key, value in props.items():
            setattr(node, key, value)
        return node

    def link(self, a, b):
        self.links.new(a, b)

    def math(self, op, a, b=None):
        node = self.new("ShaderNodeMath", operation=op)
        for i, value in enumerate((a, b)):
            if value is None:
                continue
            if isinstance(value, (int, float)):
                node.inputs[i].default_value = float(value)
            else:
                self.link(value, node.inputs[i])
        return node.outputs[0]

    def mix(self, factor, a, b):
        node = self.new("ShaderNodeMix", data_type="RGBA")
        ins = {s.identifier: s for s in node.inputs}
        for key, value in (("Factor_Float", factor), ("A_Color", a), ("B_Color", b)):
            if isinstance(value, (tuple, list)):
                ins[key].default_value = tuple(value) + ((1.0,) if len(value) == 3 else ())
            elif isinstance(value, (int, float)):
                ins[key].default_value = float(value)
            else:
                self.link(value, ins[key])
        return {s.identifier: s for s in node.outputs}["Result_Color"]

    def attribute(self, name):
        """A per-vertex field written by the studio (``hda_<name>``), interpolated over the faces."""
        return self.new("ShaderNodeAttribute", attribute_name="hda_" + name, attribute_type="GEOMETRY").outputs["Fac"]

    def scale(self, colour, factor):
        """colour (a tuple or a socket) times a float (a number or a socket)."""
        node = self.new("ShaderNodeVectorMath", operation="SCALE")
        for socket, value in ((node.inputs[0], colour), (node.inputs["Scale"], factor)):
            if isinstance(value, (tuple, list)):
                socket.default_value = tuple(value[:3])
            elif isinstance(value, (int, float)):
                socket.default_value = float(value)
            else:
                self.link(value, socket)
        return node.outputs["Vector"]

    def between(self, value, lo, hi):
        """1 where lo < value < hi, else 0."""
        return self.math("MULTIPLY", self.math("GREATER_THAN", value, lo), self.math("LESS_THAN", value, hi))

    def ramp(self, value, lo, hi):
        """0 below lo to 1 above hi, smoothly (anti-aliases the fields' contours)."""
        node = self.new("ShaderNodeMapRange", interpolation_type="SMOOTHSTEP", clamp=True)
        node.inputs["From Min"].default_value, node.inputs["From Max"].default_value = lo, hi
        self.link(value, node.inputs["Value"])
        return node.outputs["Result"]

    def noise(self, vector, scale, detail=2.0):
        node = self.new("ShaderNodeTexNoise")
        node.inputs["Scale"].default_value = scale
        node.inputs["Detail"].default_value = detail
        self.link(vector, node.inputs["Vector"])
        return node.outputs["Fac"]


def _logo_image(name, pattern, colour_res=128):
    """A star/polygon badge with a ring, as an RGBA image (alpha = the logo)."""
    import bpy

    n = colour_res
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n * 2 - 1
    r, a = np.hypot(xx, yy), np.arctan2(yy, xx) + pattern["rotation"]
    k = pattern["points"]
    star_r = 0.55 + 0.35 * (pattern["inner"] + (1 - pattern["inner"]) * (0.5 + 0.5 * np.cos(k * a)))
    inside = (r < star_r * 0.8) | ((r > 0.86) & (r < 0.98))
    rgba = np.zeros((n, n, 4), np.float32)
    rgba[..., :3] = 1.0
    rgba[..., 3] = inside
    image = bpy.data.images.new(name, n, n, alpha=True)
    image.pixels.foreach_set(rgba.reshape(-1))
    image.pack()
    return image


def _fabric(g, bsdf, spec, rest, xyz, colour):
    """Weave and heather of the cloth, then its seams and stitched hems (from the ``seam`` and ``hem``
    fields, in metres). No bump-mapped relief: it cost 10-20 % more render time (Cycles evaluates the
    height three times) for detail finer than a pixel at 256²."""
    fabric = spec["fabric"]
    heather = g.noise(rest, 110.0, detail=3.0)  # fibre-scale unevenness of the dye
    shade = g.math("ADD", g.math("MULTIPLY", heather, 0.22 if fabric != "satin" else 0.08), 0.89)
    if fabric == "denim":  # twill: diagonal ribs 4 mm apart
        twill = g.math("FRACT", g.math("MULTIPLY", g.math("ADD", xyz.outputs["X"], xyz.outputs["Y"]), 250.0))
        shade = g.math("MULTIPLY", shade, g.math("ADD", g.math("MULTIPLY", g.math("LESS_THAN", twill, 0.5), 0.14), 0.88))
    elif fabric == "knit":  # ribs 5 mm apart along the body
        rib = g.math("FRACT", g.math("MULTIPLY", g.math("ADD", xyz.outputs["X"], xyz.outputs["Z"]), 200.0))
        shade = g.math("MULTIPLY", shade, g.math("ADD", g.math("MULTIPLY", g.math("LESS_THAN", rib, 0.4), 0.12), 0.9))
    bsdf.inputs["Roughness"].default_value = {"satin": 0.32, "denim": 0.92}.get(fabric, spec.get("roughness", 0.85))
    colour = g.scale(colour, shade)
    stitch = tuple(float(x) for x in srgb_to_linear(spec["seam_colour"]))
    colour = g.mix(g.math("LESS_THAN", g.attribute("seam"), 0.0022), colour, stitch)
    hem = g.attribute("hem")
    colour = g.mix(g.math("MULTIPLY", g.math("LESS_THAN", hem, 0.004), 0.35), colour, (0.0, 0.0, 0.0))  # folded edge
    diagonal = g.math("ADD", g.math("ADD", xyz.outputs["X"], xyz.outputs["Y"]), xyz.outputs["Z"])
    dashes = g.math("LESS_THAN", g.math("FRACT", g.math("MULTIPLY", diagonal, 160.0)), 0.6)  # stitches ~4 mm apart
    return g.mix(g.math("MULTIPLY", g.between(hem, 0.0095, 0.0122), dashes), colour, stitch)


def _skin_and_face(g, spec, rest, colour):
    """Skin mottling, then brows, lips, the lash line and the eyes from the body's face fields."""
    face = spec["face"]
    lin = {k: tuple(float(x) for x in srgb_to_linear(face[k])) for k in ("iris", "lips", "brow")}
    colour = g.scale(colour, g.math("ADD", g.math("MULTIPLY", g.noise(rest, 45.0, detail=3.0), 0.12), 0.94))
    hairs = g.math("ADD", g.math("MULTIPLY", g.noise(rest, 900.0, detail=1.0), 0.3), 0.7)
    colour = g.mix(g.math("MULTIPLY", g.ramp(g.attribute("brow"), 0.0, 0.3), hairs), colour, lin["brow"])
    colour = g.mix(g.ramp(g.attribute("lips"), 0.0, 0.35), colour, lin["lips"])
    eye = g.attribute("eye")
    colour = g.mix(g.math("MULTIPLY", g.between(eye, -0.3, 0.0), 0.8), colour, g.scale(lin["brow"], 0.4))
    colour = g.mix(g.math("GREATER_THAN", eye, 0.0), colour, (0.72, 0.68, 0.64))  # the sclera
    iris = g.attribute("iris")
    inside = g.math("GREATER_THAN", eye, 0.0)
    colour = g.mix(g.math("MULTIPLY", g.math("GREATER_THAN", iris, 0.0), inside), colour, lin["iris"])
    return g.mix(g.math("MULTIPLY", g.math("GREATER_THAN", iris, 0.55), inside), colour, (0.01, 0.01, 0.01))


def _shoe_details(g, spec, xyz, colour):
    """A toe cap and laces over the instep (rest-space rules about the feet)."""
    foot = spec["foot"]
    x, y, z = xyz.outputs["X"], xyz.outputs["Y"], xyz.outputs["Z"]
    if spec.get("toe_cap"):
        toe = g.math("MULTIPLY", g.math("GREATER_THAN", z, foot["toe_z"] + 0.03), g.math("LESS_THAN", y, foot["floor_y"] + 0.06))
        colour = g.mix(toe, colour, tuple(float(c) for c in srgb_to_linear(spec["toe_cap"])))
    if spec.get("laces"):
        across = g.math("LESS_THAN", g.math("ABSOLUTE", g.math("SUBTRACT", g.math("ABSOLUTE", x), foot["x"])), 0.016)
        along = g.between(z, foot["ankle_z"] + 0.03, foot["toe_z"] + 0.015)
        rungs = g.math("LESS_THAN", g.math("FRACT", g.math("MULTIPLY", z, 1.0 / 0.012)), 0.45)
        above_sole = g.math("GREATER_THAN", y, foot["floor_y"] + 0.035)
        lace = g.math("MULTIPLY", g.math("MULTIPLY", across, along), g.math("MULTIPLY", rungs, above_sole))
        colour = g.mix(lace, colour, tuple(float(c) for c in srgb_to_linear(spec["sole"])))
    return colour


def make_material(name: str, spec: dict):
    import bpy

    material = bpy.data.materials.new(name)
    material.use_nodes = True
    g = _Nodes(material)
    bsdf = g.nodes.get("Principled BSDF")
    base = tuple(float(x) for x in srgb_to_linear(spec["colour"]))
    bsdf.inputs["Roughness"].default_value = spec.get("roughness", 0.8)
    rest = g.new("ShaderNodeAttribute", attribute_name="rest", attribute_type="GEOMETRY").outputs["Vector"]
    xyz = g.new("ShaderNodeSeparateXYZ")
    g.link(rest, xyz.inputs[0])
    colour = base
    pattern = spec.get("pattern") or {"kind": "solid"}
    second = tuple(float(x) for x in srgb_to_linear(pattern.get("colour2", spec["colour"])))
    kind = pattern["kind"]
    if kind == "stripes":
        coord = xyz.outputs["Y" if pattern["axis"] == "horizontal" else "X"]
        fract = g.math("FRACT", g.math("MULTIPLY", coord, 1.0 / pattern["period"]))
        colour = g.mix(g.math("LESS_THAN", fract, pattern["duty"]), base, second)
    elif kind == "checks":
        checker = g.new("ShaderNodeTexChecker")
        g.link(rest, checker.inputs["Vector"])
        checker.inputs["Scale"].default_value = 1.0 / pattern["period"]
        checker.inputs["Color1"].default_value = base + (1.0,)
        checker.inputs["Color2"].default_value = second + (1.0,)
        colour = checker.outputs["Color"]
    elif kind == "logo":
        centre = spec["logo_centre"]
        size = pattern["size"]
        u = g.math("ADD", g.math("MULTIPLY", g.math("SUBTRACT", xyz.outputs["X"], centre[0]), 1.0 / size), 0.5)
        v = g.math("ADD", g.math("MULTIPLY", g.math("SUBTRACT", xyz.outputs["Y"], centre[1]), 1.0 / size), 0.5)
        combine = g.new("ShaderNodeCombineXYZ")
        g.link(u, combine.inputs[0])
        g.link(v, combine.inputs[1])
        tex = g.new("ShaderNodeTexImage", interpolation="Linear", extension="CLIP")
        tex.image = _logo_image(name + "_logo", pattern)
        g.link(combine.outputs[0], tex.inputs["Vector"])
        front = g.math("GREATER_THAN", xyz.outputs["Z"], centre[2])
        colour = g.mix(g.math("MULTIPLY", tex.outputs["Alpha"], front), base, second)
    elif kind == "dots":
        cells = g.new("ShaderNodeTexVoronoi")
        g.link(rest, cells.inputs["Vector"])
        cells.inputs["Scale"].default_value = 1.0 / pattern["period"]
        cells.inputs["Randomness"].default_value = 0.35
        colour = g.mix(g.math("LESS_THAN", cells.outputs["Distance"], pattern["radius"]), base, second)
    elif kind == "camo":
        blotch = g.noise(rest, 1.0 / pattern["period"], detail=1.5)
        third = tuple(float(x) for x in srgb_to_linear(pattern["colour3"]))
        colour = g.mix(g.math("LESS_THAN", blotch, 0.44), base, second)
        colour = g.mix(g.math("GREATER_THAN", blotch, 0.58), colour, third)
    if spec.get("fabric"):
        colour = _fabric(g, bsdf, spec, rest, xyz, colour)
    if spec.get("face"):
        colour = _skin_and_face(g, spec, rest, colour)
    if spec.get("foot"):
        colour = _shoe_details(g, spec, xyz, colour)
    if spec.get("strands"):  # hair: streaks along the strands (stretched noise in rest space)
        mapping = g.new("ShaderNodeMapping")
        mapping.inputs["Scale"].default_value = (90.0, 6.0, 90.0)
        g.link(rest, mapping.inputs["Vector"])
        noise = g.new("ShaderNodeTexNoise")
        noise.inputs["Scale"].default_value = 1.0
        noise.inputs["Detail"].default_value = 3.0
        g.link(mapping.outputs[0], noise.inputs["Vector"])
        dark = tuple(0.45 * c for c in base)
        colour = g.mix(g.math("POWER", noise.outputs["Fac"], 1.5), dark, colour)
    if spec.get("sole") is not None:
        sole = tuple(float(x) for x in srgb_to_linear(spec["sole"]))
        colour = g.mix(g.math("LESS_THAN", xyz.outputs["Y"], spec["sole_y"]), colour, sole)
    if isinstance(colour, tuple):
        bsdf.inputs["Base Color"].default_value = colour + (1.0,)
    else:
        g.link(colour, bsdf.inputs["Base Color"])
    return material


# --- scene ---------------------------------------------------------------------------------------------

# --- camera and image maths (numpy only) -------------------------------------------------------------

SENSOR_WIDTH = 36.0  # mm, horizontal sensor fit
CV_TO_BLENDER_CAMERA = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV camera axes -> Blender's (y up, looking down -z)


def blender_lens(K, width: int, height: int) -> tuple[float, float, float]:
    """OpenCV intrinsics K [3,3] (fx = fy) of a width x height image -> Blender's (lens mm, shift_x, shift_y)
    for a camera of SENSOR_WIDTH mm with horizontal sensor fit (shifts in units of the larger side)."""
    k = np.asarray(K, np.float64)
    if abs(k[0][0] - k[1][1]) > 1e-6 * k[0][0]:
        raise ValueError("fx != fy is not supported")
    larger = max(width, height)
    return (float(k[0][0] / width * SENSOR_WIDTH), float((width / 2 - k[0][2]) / larger),
            float((k[1][2] - height / 2) / larger))


def blender_camera_matrix(R, t) -> np.ndarray:
    """World-to-camera R [3,3], t [3] (OpenCV) -> the Blender camera object's matrix_world [4,4]."""
    view = np.eye(4)
    view[:3, :3], view[:3, 3] = np.asarray(R, np.float64), np.asarray(t, np.float64)
    return np.linalg.inv(view) @ CV_TO_BLENDER_CAMERA


def over_background(rgba: np.ndarray, background) -> tuple[np.ndarray, np.ndarray]:
    """A render's straight-alpha RGBA [H,W,4] uint8 -> (RGB over ``background`` (0..1 RGB) [H,W,3] uint8,
    mask [H,W] uint8 = alpha)."""
    rgba = np.asarray(rgba, np.float64)
    alpha = rgba[..., 3:4] / 255.0
    rgb = rgba[..., :3] * alpha + np.asarray(background, np.float64) * 255.0 * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), rgba[..., 3].astype(np.uint8)


# --- the scene --------------------------------------------------------------------------------------------

def _render_settings(scene, spec: dict) -> None:
    render = scene.render
    render.engine = "CYCLES"
    render.resolution_x, render.resolution_y = spec["width"], spec["height"]
    render.resolution_percentage = 100
    render.film_transparent = True
    render.use_persistent_data = False
    render.image_settings.file_format = "PNG"
    render.image_settings.color_mode = "RGBA"
    render.image_settings.color_depth = "8"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    cycles = scene.cycles
    cycles.device = "CPU"
    cycles.samples = spec["samples"]
    cycles.use_adaptive_sampling = False
    cycles.seed = spec["seed"] % (2 ** 31)
    cycles.use_animated_seed = False
    cycles.use_denoising = True
    cycles.denoiser = "OPENIMAGEDENOISE"
    cycles.denoising_prefilter = "FAST"
    cycles.denoising_quality = "FAST"
    cycles.pixel_filter_type = "BOX"
    cycles.filter_width = 1.0
    cycles.max_bounces, cycles.diffuse_bounces, cycles.glossy_bounces = 4, 2, 1
    cycles.transmission_bounces, cycles.transparent_max_bounces = 0, 2
    cycles.caustics_reflective = cycles.caustics_refractive = False


def _add_world_and_lights(scene, spec: dict) -> None:
    import bpy
    from mathutils import Vector

    world = bpy.data.worlds.new("studio")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (*srgb_to_linear(spec["ambient"]), 1.0)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 1.0
    scene.world = world
    for i, light in enumerate(spec["lights"]):
        data = bpy.data.lights.new(f"light{i}", "SUN")
        data.energy = light["strength"]
        data.angle = light["angle"]
        obj = bpy.data.objects.new(f"light{i}", data)
        travel = -Vector(light["towards"]).normalized()
        obj.rotation_euler = travel.to_track_quat("-Z", "Y").to_euler()
        scene.collection.objects.link(obj)


def _add_meshes(scene, spec: dict, arrays) -> list:
    """The spec's meshes at their rest coordinates; returns [(mesh, per-frame vertices [F,V,3])]."""
    import bpy

    materials = {name: make_material(name, m) for name, m in spec["materials"].items()}
    meshes = []
    for item in spec["objects"]:
        faces = arrays[item["name"] + "/faces"]
        rest = arrays[item["name"] + "/rest"].astype(np.float32)
        mesh = bpy.data.meshes.new(item["name"])
        mesh.vertices.add(len(rest))
        mesh.vertices.foreach_set("co", rest.reshape(-1))
        mesh.loops.add(faces.size)
        mesh.loops.foreach_set("vertex_index", faces.reshape(-1).astype(np.int32))
        mesh.polygons.add(len(faces))
        mesh.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
        mesh.polygons.foreach_set("loop_total", np.full(len(faces), 3, np.int32))
        mesh.update()
        mesh.validate()
        attribute = mesh.attributes.new("rest", "FLOAT_VECTOR", "POINT")
        attribute.data.foreach_set("vector", rest.reshape(-1))
        for key in item.get("attributes", []):
            field = mesh.attributes.new("hda_" + key, "FLOAT", "POINT")
            field.data.foreach_set("value", arrays[f"{item['name']}/attr/{key}"].astype(np.float32).reshape(-1))
        mesh.shade_smooth()
        mesh.materials.append(materials[item["material"]])
        obj = bpy.data.objects.new(item["name"], mesh)
        scene.collection.objects.link(obj)
        meshes.append((mesh, arrays[item["name"] + "/frames"]))
    return meshes


def _add_cameras(scene, spec: dict) -> list:
    import bpy
    from mathutils import Matrix

    cameras = []
    for cam in spec["cameras"]:
        data = bpy.data.cameras.new(cam["name"])
        data.sensor_fit = "HORIZONTAL"
        data.sensor_width = SENSOR_WIDTH
        try:
            data.lens, data.shift_x, data.shift_y = blender_lens(cam["K"], spec["width"], spec["height"])
        except ValueError as exc:
            raise ValueError(f"camera {cam['name']}: {exc}") from None
        data.clip_start, data.clip_end = 0.05, 100.0
        obj = bpy.data.objects.new(cam["name"], data)
        obj.matrix_world = Matrix(blender_camera_matrix(cam["R"], cam["t"]).tolist())
        scene.collection.objects.link(obj)
        cameras.append(obj)
    return cameras


def build_scene(spec: dict, arrays):
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    _render_settings(scene, spec)
    _add_world_and_lights(scene, spec)
    return scene, _add_meshes(scene, spec, arrays), _add_cameras(scene, spec)


def main(work_dir: str) -> int:
    import bpy

    work = Path(work_dir)
    spec = json.loads((work / "scene.json").read_text())
    arrays = dict(np.load(work / "scene.npz", allow_pickle=False))
    scene, meshes, cameras = build_scene(spec, arrays)
    out = Path(spec["out_dir"])
    todo: dict[int, list[int]] = {}
    for c, f in spec["todo"]:
        todo.setdefault(f, []).append(c)
    tmp_png = work / "render.png"
    scene.render.filepath = str(tmp_png)
    for f in sorted(todo):
        for mesh, frames in meshes:
            mesh.vertices.foreach_set("co", frames[f].astype(np.float32).reshape(-1))
            mesh.update()
        for c in todo[f]:
            scene.camera = cameras[c]
            bpy.ops.render.render(write_still=True)
            with Image.open(tmp_png) as im:
                rgb, mask = over_background(np.asarray(im.convert("RGBA")), spec["background"])
            cam, frame = spec["cameras"][c]["name"], spec["frames"][f]
            save_png_atomic(out / "masks" / cam / f"{frame}.png", mask)
            save_png_atomic(out / "images" / cam / f"{frame}.png", rgb)
            print(f"HDA-DONE {c} {f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
