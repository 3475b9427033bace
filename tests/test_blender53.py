"""Blender 5.3 (bpy 5.3 on Python 3.13 in .venv-bpy53, built by ``make test-blender53``): the
extension's install, register and unregister with the backend installer run offline against local
wheels (as on 5.0 and 4.2); the native path: install, add a keyed avatar, render frames 1 and 10 natively with Cycles and
compare with the backend's own render of each pose; sample an identity from the bundled model and import
a clip onto the native avatar, and compare its render with the backend's too."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hda_backend.avatar.io import load_avatar
from hda_backend.avatar.model import Avatar
from hda_backend.body import load_body
from hda_backend.config import load_config
from hda_backend.render.frames import render_gaussians
from tests.test_blender_extension import (REPO, _check_report, _run_blender, _write_wheel, built_zip,  # noqa: F401
                                         slow_dir)
from tests.test_blender_scene import FRAMES, _camera_by_hand, _dirs, _poses, _psnr, _run, _srgb_to_linear

BPY53_PYTHON = REPO / ".venv-bpy53" / "bin" / "python"
SAMPLES = 32                # Cycles samples per pixel of the native renders
# Measured at 80x64, 32 samples: 40.5 / 40.2 dB (frames 1 / 10, the grey seed avatar; 28.3 / 28.5 dB
# without the rasterizer's dilation baked into the scales) and 35.0 dB (a sampled identity in colour:
# Blender blends splats in linear light, the rasterizer blends sRGB-encoded colours).
NATIVE_MIN_PSNR = 32.0

pytestmark = pytest.mark.skipif(not BPY53_PYTHON.exists(),
                                reason="no .venv-bpy53 (bpy==5.3.* on Python 3.13: `make test-blender53`)")


def _flat_render(avatar, pose, transl, object_world: np.ndarray, width: int, height: int):
    """The avatar in its own colours at one pose, rendered straight by the backend and linearised as
    the compositing layer does: (linear premultiplied RGB [H,W,3], alpha [H,W])."""
    viewmat, K = _camera_by_hand(object_world, width, height)
    with torch.no_grad():
        g = avatar(torch.tensor(pose, dtype=torch.float32).reshape(1, 165),
                   torch.tensor(transl, dtype=torch.float32).reshape(1, 3)).index(0)
        rgb, alpha = render_gaussians(g, torch.tensor(viewmat, dtype=torch.float32),
                                      torch.tensor(K, dtype=torch.float32), width, height, shading="flat")
    rgb, alpha = rgb.double().numpy(), alpha[..., 0].double().numpy()
    straight = np.clip(rgb / np.maximum(alpha, 1e-6)[..., None], 0, 1)
    return _srgb_to_linear(straight) * alpha[..., None], alpha


def _flat_frames(object_world: np.ndarray, width: int, height: int) -> dict:
    """The keyed avatar (tiny preset, seed 3) at FRAMES' poses: {frame: (rgb, alpha)}."""
    config = load_config("tiny")
    avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=3).eval()
    poses = _poses()
    return {frame: _flat_render(avatar, poses["pose"][i], poses["transl"][i], object_world, width, height)
            for i, frame in enumerate(FRAMES)}


@pytest.fixture(scope="module")
def native_run(tmp_path_factory, built_zip):  # noqa: F811
    root = tmp_path_factory.mktemp("blender53")
    rng = np.random.default_rng(5)
    clip = root / "clip.npz"
    np.savez(clip, poses=rng.normal(0, 0.2, (6, 165)), trans=np.cumsum(rng.normal(0, 0.02, (6, 3)), 0),
             mocap_frame_rate=np.array(30.0))
    return _run(BPY53_PYTHON, "native", root, _dirs(root, BPY53_PYTHON), zip=str(built_zip), samples=SAMPLES,
                clip=str(clip))


def _check_native(got, empty, ref_rgb, ref_alpha, label: str, min_psnr: float = NATIVE_MIN_PSNR) -> np.ndarray:
    """PSNR of a native render against the backend's over the same empty render; returns the region."""
    expected = ref_rgb + empty[..., :3] * (1 - ref_alpha[..., None])
    changed = np.abs(got[..., :3] - empty[..., :3]).max(-1) > 1e-2
    region = (ref_alpha > 0.02) | changed
    psnr = _psnr(got[..., :3][region], expected[region])
    print(f"{label}: native vs backend PSNR {psnr:.2f} dB on {region.sum()} avatar pixels")
    assert psnr >= min_psnr, f"{label}: PSNR {psnr:.1f} dB against the backend render"
    assert (changed & ~(ref_alpha > 1e-3)).sum() < 0.02 * region.sum()  # nothing far outside the avatar
    return ref_alpha > 0.02


def test_native_render_matches_the_backend(native_run):
    report, arrays = native_run
    assert report["version"][:2] >= [5, 3] and not report["torch_at_register"]
    assert report["errors"] == {}, report["errors"]
    native = report["native"]
    assert native["type"] == 'GAUSSIAN_SPLAT' and native["parent"] == native["splats"].removesuffix("_splats")
    assert native["layer_nodes"] == []   # the compositing layer is gone: Blender renders the avatar once
    h, w = arrays["empty_1"].shape[:2]
    reference = _flat_frames(arrays["matrix_world"], w, h)
    regions = {frame: _check_native(arrays[f"native_{frame}"], arrays[f"empty_{frame}"], *reference[frame],
                                    f"frame {frame}") for frame in FRAMES}
    assert (regions[1] ^ regions[10]).sum() > 100
    # Each frame shows its own pose, not the other frame's (the splats follow the render's frames).
    for frame, other in ((1, 10), (10, 1)):
        ref_rgb, ref_alpha = reference[other]
        empty, got = arrays[f"empty_{frame}"], arrays[f"native_{frame}"]
        wrong = ref_rgb + empty[..., :3] * (1 - ref_alpha[..., None])
        region = regions[frame] | regions[other]
        assert _psnr(got[..., :3][region], wrong[region]) < NATIVE_MIN_PSNR - 6
    assert report["splats_after_layer"] == [True, []]


def test_sampled_identity_and_imported_clip_render_natively(native_run):
    report, arrays = native_run
    assert report["sample"] == [["FINISHED"], None] and report["import"] == [["FINISHED"], None]
    assert report["sampled_errors"] == {}, report["sampled_errors"]
    avatar = load_avatar(report["avatar_file"], load_body()).eval()
    h, w = arrays["empty_1"].shape[:2]
    ref = _flat_render(avatar, arrays["sampled_pose"], arrays["sampled_transl"], arrays["matrix_world"], w, h)
    with torch.no_grad():
        count = avatar(torch.zeros(1, 165), torch.zeros(1, 3)).means.shape[1]
    assert report["sampled_points"] == count  # the sampled avatar's Gaussians, not the seed's
    _check_native(arrays["sampled_1"], arrays["empty_1"], *ref, "sampled identity, imported clip")


@pytest.fixture(scope="module")
def wheel_dir53(tmp_path_factory) -> Path:
    """tests/test_blender_extension.py's local wheels, the fake numpy at Blender 5.3's numpy version."""
    numpy_version = subprocess.run([str(BPY53_PYTHON), "-c", "from importlib import metadata; "
                                    "print(metadata.version('numpy'))"], capture_output=True, text=True,
                                   check=True).stdout.strip()
    folder = tmp_path_factory.mktemp("wheels53")
    _write_wheel(folder, "hdaprobe", "1.0", {"hdaprobe/__init__.py": "VALUE = 42\n"}, requires=["numpy"])
    _write_wheel(folder, "numpy", numpy_version, {"numpy/__init__.py": "FAKE = True\n"})
    return folder


def test_install_register_unregister_blender_5_3(tmp_path, built_zip, wheel_dir53, slow_dir):  # noqa: F811
    report = _run_blender(BPY53_PYTHON, tmp_path, built_zip, wheel_dir53, slow_dir)
    assert report["version"][:2] == [5, 3]
    _check_report(report, tmp_path, has_torch=True, torch_version="2.14.1")  # requirements-bpy53.txt's torch


def test_posing_rewrites_the_splats_for_the_evaluated_pose(native_run):
    _, arrays = native_run
    config = load_config("tiny")
    avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=3).eval()
    with torch.no_grad():
        g = avatar(torch.tensor(arrays["posed_pose"], dtype=torch.float32).reshape(1, 165),
                   torch.tensor(arrays["posed_transl"], dtype=torch.float32).reshape(1, 3)).index(0)
    means = g.means.double().numpy()
    # In the armature's frame: the body frame turned +Y up to +Z up, (x, y, z) -> (x, -z, y).
    expected = np.stack([means[:, 0], -means[:, 2], means[:, 1]], 1)
    np.testing.assert_allclose(arrays["posed_positions"], expected, atol=2e-5)
    frame_1 = _poses()["pose"][0]
    assert np.abs(arrays["posed_pose"] - frame_1).max() > 0.5  # the shoulder moved away from the key


FARM_SAMPLES = 16           # Cycles samples of the farm renders (measured: see README, Blender 5.3 > Farms)
FARM_MIN_PSNR = 30.0


@pytest.fixture(scope="module")
def native_farm_runs(tmp_path_factory, built_zip):  # noqa: F811
    """Bake a native avatar with the add-on (frames 1-10), then render the saved file in a fresh bpy
    process where the add-on is not installed, from its baked splat files."""
    root = tmp_path_factory.mktemp("blender53_farm")
    baked = _run(BPY53_PYTHON, "native_bake", root, _dirs(root, BPY53_PYTHON), zip=str(built_zip),
                 samples=FARM_SAMPLES)
    farm_root = root / "farm"   # its own Blender user folders: no extension installed there
    farm_root.mkdir()
    farm = _run(BPY53_PYTHON, "native_farm", farm_root, _dirs(farm_root, BPY53_PYTHON),
                blend=str(root / "scene" / "avatar.blend"))
    return root, baked, farm


def test_native_farm_render_without_the_addon_shows_each_baked_pose(native_farm_runs):
    root, (baked, baked_arrays), (farm, arrays) = native_farm_runs
    assert baked["bake"] == [["FINISHED"], None]
    assert baked["baked"] == [f"frame_{f:04d}.ply" for f in range(FRAMES[0], FRAMES[1] + 1)]
    assert baked["modifier_live"] == [False, False] and baked["modifier_after_save"] is False
    assert baked["modifier_disabled"] is True and baked["modifier_enabled"] is False
    assert baked["check_fresh"] == []
    # With the add-on but no backend, a frame's current bake is shown (its file's splats), not nothing.
    assert baked["fallback"][0] is True and baked["fallback_restored"] is False
    assert [e.split(";")[0] for e in baked["fallback"][1].values()] == [
        "the backend does not import (No module named 'torch')"]
    plyfile = pytest.importorskip("plyfile")
    file_10 = plyfile.PlyData.read(str(root / "scene" / "hda_splats" / "avatar" / baked["uid"]
                                       / "frame_0010.ply"))["vertex"]
    np.testing.assert_array_equal(baked_arrays["fallback_positions"],
                                  np.stack([file_10["x"], file_10["y"], file_10["z"]], 1))
    assert not farm["addon_loaded"] and farm["modifier_saved"] == [True, True]
    h, w = arrays["empty_1"].shape[:2]
    reference = _flat_frames(baked_arrays["matrix_world"], w, h)
    regions = {frame: _check_native(arrays[f"farm_{frame}"], arrays[f"empty_{frame}"], *reference[frame],
                                    f"farm frame {frame}", FARM_MIN_PSNR) for frame in FRAMES}
    assert (regions[1] ^ regions[10]).sum() > 100
    for frame, other in ((1, 10), (10, 1)):   # each frame shows its own pose, not the saved one
        ref_rgb, ref_alpha = reference[other]
        empty = arrays[f"empty_{frame}"]
        region = regions[frame] | regions[other]
        wrong = ref_rgb + empty[..., :3] * (1 - ref_alpha[..., None])
        assert _psnr(arrays[f"farm_{frame}"][..., :3][region], wrong[region]) < FARM_MIN_PSNR - 6


def test_a_frame_without_its_baked_file_renders_magenta_not_empty(native_farm_runs):
    _, _, (farm, arrays) = native_farm_runs
    missing = farm["missing_frame"]
    assert missing["points"] == missing["saved_points"] > 0 and missing["sh"] == []
    assert farm["missing_frame_type"] == "FLOAT_COLOR"
    # colour = C0 * sh0 + 0.5 (gsplat's SH basis): pink-magenta (1, 0.5, 1), opaque.
    colour = 0.2820947917738781 * arrays["missing_base"][:, :3] + 0.5
    np.testing.assert_allclose(colour, np.broadcast_to([1.0, 0.5, 1.0], colour.shape), atol=1e-5)
    np.testing.assert_allclose(arrays["missing_base"][:, 3], 1.0)


def test_pose_camera_and_range_changes_after_the_bake_are_named(native_farm_runs):
    root, (baked, _), _ = native_farm_runs
    stale = ["HDA_Avatar: frame 10: the pose changed since the bake"]
    assert baked["check_stale_op"] == [["FINISHED"], None] and baked["check_stale"] == stale
    assert baked["check_camera_range"] == ["HDA_Avatar: frame 1: the camera changed since the bake",
                                           "HDA_Avatar: frame 10: the pose changed since the bake",
                                           "HDA_Avatar: frame 19: no splat file: bake it"]
    # hda check-blend's Blender side, on the file the farm process saved after changing the pose.
    out = root / "check.json"
    check = [str(BPY53_PYTHON), str(REPO / "blender_addon" / "check_blend_child.py"), str(REPO),
             str(root / "scene" / "avatar.blend"), str(out)]
    proc = subprocess.run(check, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["avatars"] == 1 and report["lines"] == stale, report
    # The same file saved with its modifier off (e.g. after the add-on was disabled): named too.
    off = root / "off.py"
    off.write_text("import bpy\nbpy.ops.wm.open_mainfile(filepath=%r)\n"
                   "next(o for o in bpy.data.objects if o.type == 'POINTCLOUD').modifiers['HDA Farm Splats']"
                   ".show_render = False\nbpy.ops.wm.save_mainfile()\n" % str(root / "scene" / "avatar.blend"))
    subprocess.run([str(BPY53_PYTHON), str(off)], capture_output=True, check=True, timeout=300)
    subprocess.run(check, capture_output=True, check=True, timeout=300)
    assert json.loads(out.read_text())["lines"] == [
        "HDA_Avatar: its 'HDA Farm Splats' modifier is off in the saved file, so a farm renders the pose saved in "
        "it: save the file with the add-on enabled"] + stale
