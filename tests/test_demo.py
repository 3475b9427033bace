"""``make demo`` (scripts/demo.py + scripts/demo_blender.py), shortened: 2 identities, 3 frames, 128².

The demo runs as a user runs it (a subprocess, real bpy in its child), on a tiny diffusion model
trained here. Its output folder is then *moved* before anything is checked, so every path the saved
.blend relies on must be relative. References are independent of the demo's code: the backend
renders each identity file at the pose of the motion file written for Blender through a camera built
by hand from the saved scene, the occluder's silhouette is its projected box, Blender re-renders the
moved .blend without the add-on (with and without compositing), and sampling is redone in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from hda_backend.avatar.io import load_avatar, read_avatar_file
from hda_backend.body import load_body
from hda_backend.diffusion.sample import load_diffusion, sample_vectors
from hda_backend.diffusion.weights import vector_to_state_dict
from hda_backend.render.frames import render_gaussians
from tests.test_blender_extension import ADDON, BPY50_PYTHON, REPO, _hermetic_env, built_zip  # noqa: F401

DEMO = REPO / "scripts" / "demo.py"
IDENTITIES, FRAMES, SIZE = 2, 3, 128
SEED = 5
BODY_TO_OBJECT = np.array([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # +Y up -> +Z up
CV_FROM_BLENDER_CAMERA = np.diag([1.0, -1.0, -1.0, 1.0])  # Blender's camera looks down -Z with +Y up


def _env(root: Path) -> dict:
    (root / "home").mkdir(parents=True, exist_ok=True)
    env = _hermetic_env(HOME=str(root / "home"), HDA_CACHE_DIR=str(root / "cache"), OMP_WAIT_POLICY="PASSIVE")
    env.pop("HDA_SMPLX_PATH", None)
    return env


def _demo(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO), *args], env=_env(root), capture_output=True, text=True,
                          timeout=600, cwd=root)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny-preset diffusion model trained here on three avatars that differ in colour (5 s)."""
    from hda_backend.avatar.io import save_avatar
    from hda_backend.avatar.model import Avatar
    from hda_backend.config import load_config
    from hda_backend.diffusion.train import train_diffusion

    folder = tmp_path_factory.mktemp("model")
    config = load_config("tiny")
    body = load_body()
    for i in range(3):
        avatar = Avatar.from_init(body, config.uv.res, config.unet, config.gaussians, seed=0)
        with torch.no_grad():  # the SH DC bias: one colour per avatar
            avatar.unet.outc.bias[11:14] = torch.tensor([0.9, -0.6, 0.3]) * (i - 1)
        save_avatar(avatar, folder / "fits" / f"a{i}.hda.safetensors", origin=f"test:{i}")
    out = folder / "tiny.diffusion.safetensors"
    # 60 steps: enough for seeds to land on different colours (an untrained denoiser gives the mean avatar)
    train_diffusion(folder / "fits", out, config.diffusion, steps=60, progress=False, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model) -> dict:
    """Run the shortened demo, then move its folder elsewhere; returns the moved folder and demo.json."""
    root = tmp_path_factory.mktemp("demo")
    proc = _demo(root, "--out", str(root / "made" / "demo"), "--model", str(tiny_model), "--identities",
                 str(IDENTITIES), "--frames", str(FRAMES), "--size", str(SIZE), "--seed", str(SEED))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    moved = root / "moved" / "demo"
    moved.parent.mkdir()
    shutil.move(root / "made" / "demo", moved)
    return {"out": moved, "json": json.loads((moved / "demo.json").read_text()), "stdout": proc.stdout,
            "root": root}


_REOPEN = r'''
import json, os, sys
args = json.loads(sys.argv[1])
import bpy
import numpy as np
from mathutils import Vector

report = {}


def rows(m):
    return [list(r) for r in m]


def channelbag_fcurves(obj):
    ad = obj.animation_data
    from bpy_extras.anim_utils import action_get_channelbag_for_slot
    bag = action_get_channelbag_for_slot(ad.action, ad.action_slot)
    return list(bag.fcurves)


def render(scene, tag):
    scene.render.filepath = os.path.join(args["renders"], tag + "_")
    bpy.ops.render.render(animation=True)


# 1. A farm: the moved file opened without the add-on (and without torch) renders from its baked layers.
bpy.ops.wm.open_mainfile(filepath=args["blend"])
scene = bpy.context.scene
cam = scene.camera
report["camera"] = {"matrix_world": rows(cam.matrix_world), "lens": cam.data.lens,
                    "sensor_width": cam.data.sensor_width, "sensor_fit": cam.data.sensor_fit,
                    "shift": [cam.data.shift_x, cam.data.shift_y], "type": cam.data.type}
r = scene.render
report["render"] = [r.resolution_x, r.resolution_y, r.resolution_percentage, r.pixel_aspect_x, r.pixel_aspect_y,
                    r.fps, scene.frame_start, scene.frame_end]
arms = sorted((o for o in scene.objects if o.type == 'ARMATURE'), key=lambda o: o.name)
report["armatures"] = {}
for arm in arms:
    curves = channelbag_fcurves(arm)
    report["armatures"][arm.name] = {
        "matrix_world": rows(arm.matrix_world), "action": arm.animation_data.action.name,
        "fcurves": len(curves), "keys": sorted({len(fc.keyframe_points) for fc in curves})}
pillar = scene.objects["Pillar"]
report["pillar"] = [list(pillar.matrix_world @ Vector(c)) for c in pillar.bound_box]
report["layer_images"] = {img.name: [img.filepath, img.source, os.path.isfile(bpy.path.abspath(img.filepath))]
                          for img in bpy.data.images if img.name.startswith("HDA Layer")}
render(scene, "farm")
scene.render.use_compositing = False
render(scene, "plain")
report["addon_loaded"] = any(m.startswith(args["addon"]) for m in sys.modules)
report["torch_loaded"] = "torch" in sys.modules
clip = bpy.data.movieclips.load(args["video"])
report["video"] = [clip.frame_duration, list(clip.size)]

# 2. With the extension installed: each avatar's saved state points at its identity file, which loads.
bpy.ops.extensions.package_install_files(filepath=args["zip"], repo="user_default", enable_on_install=True)
bpy.ops.wm.open_mainfile(filepath=args["blend"])
import importlib
runtime = importlib.import_module(args["addon"] + ".blender_addon.runtime")
report["avatars"] = {}
for obj in bpy.context.scene.objects:
    if obj.type == 'ARMATURE' and obj.hda.is_avatar:
        h = obj.hda
        report["avatars"][obj.name] = {"seed": h.seed, "avatar_path": h.avatar_path, "enabled": h.enabled,
                                       "uid": h.uid, "exists": os.path.isfile(bpy.path.abspath(h.avatar_path)),
                                       "gaussians": runtime.get_avatar(obj).num_gaussians}
json.dump(report, open(args["report"], "w"))
'''


@pytest.fixture(scope="module")
def reopened(demo, built_zip) -> dict:  # noqa: F811
    """Blender re-opens the moved demo.blend: scene facts, and renders with and without compositing."""
    root = demo["root"] / "reopen"
    renders = root / "renders"
    renders.mkdir(parents=True)
    (root / "driver.py").write_text(_REOPEN)
    args = {"blend": str(demo["out"] / "demo.blend"), "renders": str(renders), "addon": ADDON, "zip": str(built_zip),
            "video": str(demo["out"] / "demo.mp4"), "report": str(root / "report.json")}
    env = _env(root)
    env["BLENDER_USER_RESOURCES"] = str(root / "blender_user")
    proc = subprocess.run([str(BPY50_PYTHON), str(root / "driver.py"), json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=400, cwd=root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((root / "report.json").read_text())
    report["renders"] = renders
    return report


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def _frames(demo) -> list[np.ndarray]:
    return [_png(demo["out"] / f) for f in demo["json"]["files"]["frames"]]


def _camera(report) -> tuple[np.ndarray, np.ndarray]:
    """World -> OpenCV camera [4,4] and K [3,3] of the scene camera, from the pinhole model: sensor
    fit AUTO (the sensor width across the larger side), no shift, square pixels."""
    cam = report["camera"]
    assert cam["type"] == "PERSP" and cam["sensor_fit"] == "AUTO" and cam["shift"] == [0.0, 0.0]
    w, h, pct, ax, ay = report["render"][:5]
    assert (pct, ax, ay) == (100, 1.0, 1.0)
    f = cam["lens"] / cam["sensor_width"] * max(w, h)
    K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]])
    return CV_FROM_BLENDER_CAMERA @ np.linalg.inv(np.array(cam["matrix_world"])), K


def _avatar_alpha(demo, report, name: str, seed: int, motion: str, frame: int) -> np.ndarray:
    """Coverage [H,W] of the identity file ``seed`` at motion frame ``frame - 1`` (the clip's rate is
    the scene's: one key per frame), through the scene camera, rendered by the backend."""
    world_to_cam, K = _camera(report)
    arm_world = np.array(report["armatures"][name]["matrix_world"])
    viewmat = world_to_cam @ arm_world @ BODY_TO_OBJECT
    avatar = load_avatar(demo["out"] / "identities" / f"sample_{seed}.hda.safetensors", load_body()).eval()
    with np.load(demo["out"] / motion) as m:
        pose, transl = m["poses"][frame - 1], m["trans"][frame - 1]
    with torch.no_grad():
        g = avatar(torch.tensor(pose, dtype=torch.float32)[None], torch.tensor(transl, dtype=torch.float32)[None])
        _, alpha = render_gaussians(g.index(0), torch.tensor(viewmat, dtype=torch.float32),
                                    torch.tensor(K, dtype=torch.float32), SIZE, SIZE)
    return alpha[..., 0].double().numpy()


def _pillar_mask(report) -> np.ndarray:
    """Pixels inside the pillar's projected box (the convex hull of its 8 projected corners)."""
    world_to_cam, K = _camera(report)
    corners = np.c_[np.array(report["pillar"]), np.ones(8)]
    cam = (world_to_cam @ corners.T).T[:, :3]
    assert (cam[:, 2] > 0).all()
    uv = (K @ cam.T).T
    uv = uv[:, :2] / uv[:, 2:]
    hull = _convex_hull(uv)
    image = Image.new("L", (SIZE, SIZE), 0)
    # PIL puts pixel centres on whole coordinates; the camera's are at +0.5.
    ImageDraw.Draw(image).polygon([(float(x) - 0.5, float(y) - 0.5) for x, y in hull], fill=255)
    return np.asarray(image) > 0


def _convex_hull(points: np.ndarray) -> list:
    pts = sorted(map(tuple, points))

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and np.cross(np.subtract(out[-1], out[-2]), np.subtract(p, out[-2])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return half(pts) + half(pts[::-1])


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    image = Image.fromarray((mask * 255).astype(np.uint8))
    return np.asarray(image.filter(ImageFilter.MaxFilter(2 * pixels + 1))) > 0


def _shrink(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ~_grow(~mask, pixels)


# --------------------------------------------------------------------------------------------- tests
def test_frames_have_the_size_and_count_asked_for_and_change_every_frame(demo):
    summary = demo["json"]
    assert summary["files"]["frames"] == [f"frames/frame_{f:04d}.png" for f in range(1, FRAMES + 1)]
    frames = _frames(demo)
    assert all(f.shape == (SIZE, SIZE, 3) for f in frames)
    for a, b in zip(frames, frames[1:]):
        assert (np.abs(a - b).max(-1) > 4 / 255).sum() > 20  # the people move
    assert summary["seeds"] == [SEED, SEED + 1] and summary["scene_seeds"] == [SEED, SEED + 1]
    assert set(summary["seconds"]) >= {"sample", "backend_pictures", "extension_zip", "blender", "gif", "total"}
    assert "total" in demo["stdout"] and "demo:" in demo["stdout"]
    # Blender ran with user folders of its own: no config, extensions or thumbnails in the (test's) home.
    assert not (demo["root"] / "home" / ".config").exists() and not (demo["root"] / "home" / ".cache").exists()


def test_the_people_are_composited_where_the_backend_projects_them_and_nowhere_else(demo, reopened):
    frames, summary = _frames(demo), demo["json"]
    names = sorted(reopened["armatures"])
    motions = summary["files"]["motions"]
    assert len(names) == 2 and len(motions) == 2
    pillar = _pillar_mask(reopened)
    for frame in range(1, FRAMES + 1):
        plain = _png(reopened["renders"] / f"plain_{frame:04d}.png")  # the scene without the people
        got = frames[frame - 1]
        alphas = [_avatar_alpha(demo, reopened, name, seed, motion, frame)
                  for name, seed, motion in zip(names, summary["scene_seeds"], motions)]
        cover = np.max(alphas, axis=0)
        changed = np.abs(got - plain).max(-1) > 3 / 255
        # Nothing changes away from the people (their shadows come from the proxies, in both renders).
        assert not (changed & ~_grow(cover > 2e-3, 1)).any()
        # Where a person covers the pixel and the pillar does not, the picture shows the person.
        seen = (cover > 0.9) & ~_grow(pillar, 2)
        assert seen.sum() > 150, f"frame {frame}: only {seen.sum()} unoccluded person pixels"
        assert changed[seen].mean() > 0.9, f"frame {frame}: the people are missing"


def test_the_pillar_hides_the_walker_where_it_stands_in_front(demo, reopened):
    summary = demo["json"]
    walker = sorted(reopened["armatures"])[0]
    assert "walk" in walker
    middle = (FRAMES + 1) // 2  # the pillar is placed where the walker is halfway through
    alpha = _avatar_alpha(demo, reopened, walker, summary["scene_seeds"][0], summary["files"]["motions"][0], middle)
    behind = (alpha > 0.5) & _shrink(_pillar_mask(reopened), 2)
    assert behind.sum() > 100, f"the pillar covers only {behind.sum()} walker pixels"
    got = _frames(demo)[middle - 1]
    plain = _png(reopened["renders"] / f"plain_{middle:04d}.png")
    assert np.abs(got - plain)[behind].max() <= 1 / 255  # the pillar, not the walker


def test_the_moved_blend_rerenders_the_demo_without_the_addon(demo, reopened):
    assert not reopened["addon_loaded"] and not reopened["torch_loaded"]
    for frame, got in enumerate(_frames(demo), start=1):
        farm = _png(reopened["renders"] / f"farm_{frame:04d}.png")
        assert np.abs(farm - got).max() <= 1 / 255


def _identity_name(seed: int, model: Path) -> str:
    """Sample Identity's content-addressed file name (blender_addon/identity.py): seed and model digest."""
    import hashlib

    return f"identity_{seed}-{hashlib.sha256(model.read_bytes()).hexdigest()[:12]}.hda.safetensors"


def test_the_blend_keeps_relative_paths_motions_and_avatar_state(demo, reopened, tiny_model):
    summary = demo["json"]
    assert reopened["render"] == [SIZE, SIZE, 100, 1.0, 1.0, summary["fps"], 1, FRAMES]
    avatars = reopened["avatars"]
    assert sorted(a["seed"] for a in avatars.values()) == summary["scene_seeds"]
    for name, a in avatars.items():
        assert a["avatar_path"] == f"//hda_avatars/{_identity_name(a['seed'], tiny_model)}" and a["exists"]
        assert a["enabled"] and a["gaussians"] > 0
        arm = reopened["armatures"][name]
        # One key per frame on every bone's quaternion (4 x 55) and the pelvis location (3).
        assert arm["fcurves"] == 4 * 55 + 3 and arm["keys"] == [FRAMES]
        layer = reopened["layer_images"][f"HDA Layer {a['uid']}"]
        assert layer == [f"//hda_layers/demo/{a['uid']}/layer_0001.exr", "SEQUENCE", True]
        baked = sorted(os.listdir(demo["out"] / "hda_layers" / "demo" / a["uid"]))
        assert baked == [f"layer_{f:04d}.exr" for f in range(1, FRAMES + 1)]


def test_gif_and_video_hold_every_frame(demo, reopened):
    gif = Image.open(demo["out"] / "demo.gif")
    assert gif.n_frames == FRAMES and gif.size == (SIZE, SIZE) and gif.info["loop"] == 0
    for i, frame in enumerate(_frames(demo)):
        gif.seek(i)
        decoded = np.asarray(gif.convert("RGB"), dtype=np.float64) / 255
        assert np.abs(decoded - frame).mean() < 4 / 255  # one 255-colour palette, dithered
    assert reopened["video"] == [FRAMES, [SIZE, SIZE]]


def test_identity_files_are_the_models_samples_for_the_demo_seeds(demo, tiny_model):
    model = load_diffusion(tiny_model)
    seeds = demo["json"]["seeds"]
    vectors = sample_vectors(model, seeds)
    expected = [vector_to_state_dict(v, model.spec) for v in vectors]
    files = {s: [demo["out"] / "identities" / f"sample_{s}.hda.safetensors"] for s in seeds}
    for s in demo["json"]["scene_seeds"]:  # sampled in Blender by hda.sample_identity
        files[s].append(demo["out"] / "hda_avatars" / _identity_name(s, tiny_model))
    for seed, want in zip(seeds, expected):
        for path in files[seed]:
            _, tensors = read_avatar_file(path)
            assert tensors.keys() == want.keys()
            assert all(torch.equal(tensors[k], want[k]) for k in want), path


def test_contact_sheet_shows_every_identity_and_the_strip_one_identity_in_changing_poses(demo):
    sheet = _png(demo["out"] / "contact_sheet.png")
    label, tile = 14, 256  # contact_sheet(): a 14-pixel label row above each tile
    assert sheet.shape == (label + tile, IDENTITIES * tile, 3)
    tiles = [sheet[label:, i * tile:(i + 1) * tile] for i in range(IDENTITIES)]
    for t in tiles:
        assert (t.min(-1) < 0.9).mean() > 0.02  # a person on the white background
    assert np.abs(tiles[0] - tiles[1]).mean() > 0.01  # two different people
    assert (sheet[:label].min(-1) < 0.5).any()  # the seed labels
    strip = _png(demo["out"] / "identity_strip.png")
    assert strip.shape == (label + tile, 6 * tile, 3)
    poses = [strip[label:, i * tile:(i + 1) * tile] < 0.9 for i in range(6)]
    for a, b in zip(poses, poses[1:]):
        assert (a != b).any(-1).mean() > 0.01  # another pose, another silhouette


@pytest.mark.parametrize("args, words", [
    (["--identities", "0"], "--identities 0: expected 1..64"),
    (["--identities", "1000"], "--identities 1000: expected 1..64"),
    (["--size", "8"], "--size 8: expected 64..2048"),
    (["--size", "100000"], "--size 100000: expected 64..2048"),
    (["--frames", "many"], "--frames 'many': expected a whole number"),
    (["--samples", "-1"], "--samples -1: expected 1..4096"),
    (["--colour", "red"], "unrecognized arguments: --colour red"),
])
def test_bad_arguments_end_in_one_line_and_status_2(tmp_path, args, words):
    proc = _demo(tmp_path, "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("demo: error: ") and words in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_or_corrupt_model_ends_in_one_line_and_writes_nothing(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    proc = _demo(tmp_path, "--out", str(tmp_path / "out"), "--model", str(missing))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--model" in proc.stderr and str(missing) in proc.stderr and "not found" in proc.stderr
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    proc = _demo(tmp_path, "--out", str(tmp_path / "out"), "--model", str(corrupt))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert str(corrupt) in proc.stderr
    assert not (tmp_path / "out").exists()
