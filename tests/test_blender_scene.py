"""Avatars in real Blender: rig, per-frame layers, compositing with depth, save/reload, farms, undo.

Blender runs in child processes (tests/blender_scene_driver.py), with its user folders in a tmp
folder and the extension installed from the zip by Blender's own installer. Every rendered frame
is compared with an independent reference: the backend rendering the same SMPL-X pose through a
camera written out by hand here, composited over Blender's own render of the empty scene.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hda_backend import rig
from hda_backend.avatar.model import Avatar
from hda_backend.body import load_body, pose_body
from hda_backend.config import load_config
from hda_backend.render.frames import render_gaussians
from tests.test_blender_extension import ADDON, BPY42_PYTHON, BPY50_PYTHON, REPO, _hermetic_env, built_zip  # noqa: F401

DRIVER = Path(__file__).with_name("blender_scene_driver.py")
FRAMES = (1, 10)
CAMERA = {"location": [0.35, -4.6, 1.05], "rotation": [math.radians(88), 0.0, math.radians(3)], "lens": 45.0,
          "shift_x": 0.04}
RESOLUTION, PERCENTAGE = (160, 128), 50   # renders at 80 x 64
CUBE = [0.2, -1.0, 1.15]                  # between the camera and the avatar's chest


def _poses() -> dict:
    rng = np.random.default_rng(11)
    pose = rng.normal(0, 0.15, (2, 165))
    pose[:, :3] = [[0.0, 0.3, 0.0], [0.1, -0.5, 0.0]]       # global orientation: turning about up
    pose[1, 16 * 3:16 * 3 + 3] = [0.0, 0.0, -1.1]           # left shoulder: the arm comes down
    pose[1, 4 * 3:4 * 3 + 3] = [0.9, 0.0, 0.0]              # left knee bends
    return {"pose": pose, "transl": np.array([[0.0, 0.0, 0.0], [0.05, 0.02, -0.1]])}


def _run(python: Path, phase: str, folder: Path, env_dirs: dict, **extra) -> tuple[dict, dict]:
    out = folder / phase
    out.mkdir(parents=True, exist_ok=True)
    args = {"phase": phase, "addon": ADDON, "out": str(out), "camera": CAMERA, "resolution": RESOLUTION,
            "percentage": PERCENTAGE, "cube": CUBE, "poses": str(env_dirs["poses"]),
            "blend": str(folder / "scene" / "avatar.blend"), **extra}
    (out / "args.json").write_text(json.dumps(args))
    env = _hermetic_env(BLENDER_USER_RESOURCES=str(env_dirs["user"]), HOME=str(env_dirs["home"]),
                        NUMBA_CACHE_DIR=str(env_dirs["numba"]), HDA_CACHE_DIR=str(env_dirs["cache"]),
                        OMP_WAIT_POLICY="PASSIVE")
    env.pop("HDA_SMPLX_PATH", None)
    proc = subprocess.run([str(python), str(DRIVER), str(out / "args.json")], env=env, capture_output=True,
                          text=True, timeout=400, cwd=out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    with np.load(out / "arrays.npz") as data:
        arrays = {k: data[k] for k in data.files}
    report = json.loads((out / "report.json").read_text())
    report["stderr"] = proc.stderr
    return report, arrays


def _dirs(root: Path, python: Path) -> dict:
    dirs = {k: root / k for k in ("user", "home", "numba", "cache")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    (root / "scene").mkdir(exist_ok=True)
    dirs["poses"] = root / "poses.npz"
    np.savez(dirs["poses"], **_poses())
    return dirs


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("blender_scene")


@pytest.fixture(scope="module")
def main_run(scene_root, built_zip):  # noqa: F811
    dirs = _dirs(scene_root, BPY50_PYTHON)
    return _run(BPY50_PYTHON, "main", scene_root, dirs, zip=str(built_zip))


@pytest.fixture(scope="module")
def reload_run(scene_root, main_run):
    return _run(BPY50_PYTHON, "reload", scene_root, _dirs(scene_root, BPY50_PYTHON))


@pytest.fixture(scope="module")
def farm_run(scene_root, main_run):
    return _run(BPY50_PYTHON, "farm", scene_root, _dirs(scene_root, BPY50_PYTHON))


# ------------------------------------------------------------------------------- independent reference
def _euler_xyz(angles) -> np.ndarray:
    c, s = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return rz @ ry @ rx


def _camera_by_hand(object_world: np.ndarray, width: int, height: int):
    """OpenCV (viewmat, K) of CAMERA for the avatar's body frame, from the pinhole model: sensor fit
    AUTO (36 mm across the larger side), shift in units of the larger side."""
    cam = np.eye(4)
    cam[:3, :3] = _euler_xyz(CAMERA["rotation"])
    cam[:3, 3] = CAMERA["location"]
    flip = np.diag([1.0, -1.0, -1.0, 1.0])  # Blender's camera looks down -Z with +Y up
    body_to_object = np.eye(4)
    body_to_object[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]
    viewmat = flip @ np.linalg.inv(cam) @ object_world @ body_to_object
    size = max(width, height)
    f = CAMERA["lens"] / 36.0 * size
    K = np.array([[f, 0, width / 2 - CAMERA["shift_x"] * size], [0, f, height / 2], [0, 0, 1]])
    return viewmat, K


def _srgb_to_linear(c):
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _backend_frames(object_world: np.ndarray, width: int, height: int) -> dict:
    """The avatar (tiny preset, seed 3, clay) rendered straight by the backend: linear premultiplied."""
    config = load_config("tiny")
    avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=3).eval()
    viewmat, K = _camera_by_hand(object_world, width, height)
    poses, out = _poses(), {}
    with torch.no_grad():
        for i, frame in enumerate(FRAMES):
            g = avatar(torch.tensor(poses["pose"][i:i + 1], dtype=torch.float32),
                       torch.tensor(poses["transl"][i:i + 1], dtype=torch.float32)).index(0)
            rgb, alpha = render_gaussians(g, torch.tensor(viewmat, dtype=torch.float32),
                                          torch.tensor(K, dtype=torch.float32), width, height, shading="clay")
            rgb, alpha = rgb.double().numpy(), alpha[..., 0].double().numpy()
            straight = np.clip(rgb / np.maximum(alpha, 1e-6)[..., None], 0, 1)
            out[frame] = (_srgb_to_linear(straight) * alpha[..., None], alpha)
    return out


def _same_render(a, b) -> bool:
    """Equal up to one step of the half-float layer file. Renders of the same frame in different
    processes are not bit-reproducible: the UNet's CPU convolutions differ in the last float32 bits
    with buffer alignment, and now and then such a difference rounds to the neighbouring half
    (measured: one pixel in 5,120 off by 3.8e-6; before half storage, up to 4e-7 in a fifth of the
    avatar's pixels), far below one step of any 8- or 16-bit output."""
    return a.shape == b.shape and float(np.abs(a - b).max()) <= 2e-5


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-20))


def check_key_render(report: dict, arrays: dict) -> None:
    """Avatar in the output, moving between frames, and equal to the backend's own render of each
    frame's pose composited over Blender's empty render."""
    assert report["errors"] == {}, report["errors"]
    h, w = arrays["empty_1"].shape[:2]
    assert (w, h) == (RESOLUTION[0] * PERCENTAGE // 100, RESOLUTION[1] * PERCENTAGE // 100)
    reference = _backend_frames(arrays["matrix_world"], w, h)
    regions = {}
    for frame in FRAMES:
        empty, got = arrays[f"empty_{frame}"], arrays[f"avatar_{frame}"]
        ref_rgb, ref_alpha = reference[frame]
        changed = np.abs(got[..., :3] - empty[..., :3]).max(-1) > 1e-3
        assert changed.sum() > 300, "the avatar is missing from the render"
        regions[frame] = ref_alpha > 0.02
        assert (changed & ~(ref_alpha > 1e-4)).sum() == 0  # nothing outside the avatar changed
        expected = ref_rgb + empty[..., :3] * (1 - ref_alpha[..., None])
        region = regions[frame] | changed
        psnr = _psnr(got[..., :3][region], expected[region])
        assert psnr >= 35.0, f"frame {frame}: PSNR {psnr:.1f} dB against the backend render"
    moved = (regions[1] ^ regions[10]).sum()
    assert moved > 100, f"only {moved} pixels changed between frames 1 and 10"


# ----------------------------------------------------------------------------------------------- tests
def test_register_does_not_import_torch_and_undo_removes_an_added_avatar(main_run):
    report, _ = main_run
    assert report["install"] == ["FINISHED"] and not report["torch_at_register"]
    assert report["add"] == [["FINISHED"], None] and report["undo"] == [["FINISHED"], None]
    assert set(report["after_add"]) - set(report["objects_before_add"]) == {"HDA_Avatar", "HDA_Avatar_proxy"}
    assert report["after_undo"] == report["objects_before_add"]


# A shadow-only caster: it renders (casts shadows) but no camera, diffuse, glossy, transmission or volume ray sees it.
SHADOW_ONLY = {"hide_render": False, "visible_camera": False, "visible_diffuse": False, "visible_glossy": False,
               "visible_transmission": False, "visible_volume_scatter": False, "visible_shadow": True}


def check_proxy_in_renders(report):
    """The proxy stays shadow-only through the Cycles renders; Workbench, which draws every renderable
    object whatever its ray visibility, renders with it hidden, and it is shadow-only again after."""
    assert report["proxy_before_workbench"] == SHADOW_ONLY
    assert report["workbench_proxy"] == {"during": [True], "after": SHADOW_ONLY}


def test_armature_has_the_smplx_skeleton_and_a_skinned_proxy(main_run):
    report, arrays = main_run
    a = report["avatar"]
    names = list(rig.JOINT_NAMES)
    assert a["bones"] == sorted(names)
    assert a["parents"] == [None if p < 0 else names[p] for p in rig.PARENTS]
    assert a["modes"] == ["QUATERNION"]
    assert a["proxy_groups"] == sorted(names) and a["proxy_parent"] == a["name"]
    assert a["proxy_visibility"] == SHADOW_ONLY
    check_proxy_in_renders(report)
    assert 1000 <= a["proxy_faces"] <= 3200 and a["proxy_modifiers"] == [["ARMATURE", a["name"]]]
    layout = rig.bone_layout(load_body())
    # Blender's rest bones (from head, tail, roll) are the layout's frames: the roll convention holds.
    assert np.abs(arrays["matrix_local"][:, :3, :3] - layout.matrices).max() < 1e-4  # Blender: float32
    assert np.abs(arrays["matrix_local"][:, :3, 3] - layout.heads).max() < 1e-6


def test_blender_posed_bones_are_the_smplx_joints_and_read_back_as_the_pose(main_run):
    _, arrays = main_run
    body, poses = load_body(), _poses()
    world = arrays["arm_world"]
    posed = pose_body(body, torch.tensor(poses["pose"], dtype=torch.float32),
                      transl=torch.tensor(poses["transl"], dtype=torch.float32)).joints.double().numpy()
    for i, frame in enumerate(FRAMES):
        expected = (world[:3, :3] @ rig.to_blender(posed[i]).T).T + world[:3, 3]
        assert np.abs(arrays[f"bones_world_{frame}"][:, :3, 3] - expected).max() < 1e-4
        got = rig.axis_angle_to_matrix(arrays[f"read_pose_{frame}"].reshape(55, 3))
        want = rig.axis_angle_to_matrix(poses["pose"][i].reshape(55, 3))
        assert np.abs(got - want).max() < 1e-4
        assert np.abs(arrays[f"read_transl_{frame}"] - poses["transl"][i]).max() < 1e-5


def test_camera_matches_blenders_projection(main_run):
    report, arrays = main_run
    w, h = report["render_size"]
    viewmat, K = arrays["cam_viewmat"], arrays["cam_K"]
    # world -> the avatar's body frame -> camera -> pixels
    body_to_world = arrays["arm_world"].copy()
    body_to_world[:3, :3] = body_to_world[:3, :3] @ rig.AXIS_YUP_TO_ZUP
    body_pts = (np.linalg.inv(body_to_world) @ np.c_[arrays["cam_points"], np.ones(40)].T).T
    cam = (viewmat @ body_pts.T).T[:, :3]
    uv = (K @ cam.T).T
    ndc = arrays["cam_ndc"]  # Blender: x, y in [0,1] from the bottom left, z the view distance
    assert np.allclose(uv[:, 0] / uv[:, 2], ndc[:, 0] * w, atol=1e-3)
    assert np.allclose(uv[:, 1] / uv[:, 2], (1 - ndc[:, 1]) * h, atol=1e-3)
    assert np.allclose(cam[:, 2], ndc[:, 2], atol=1e-4)
    hand_view, hand_K = _camera_by_hand(arrays["arm_world"], w, h)
    assert np.allclose(viewmat, hand_view, atol=1e-5) and np.allclose(K, hand_K, atol=1e-4)


def test_rendered_frames_match_the_backend(main_run):
    check_key_render(*main_run)


def test_scrubbing_back_is_served_from_the_frame_cache(main_run):
    report, arrays = main_run
    assert report["again_misses"] == 0
    # With the Frame Cache preference at 0 nothing is kept or looked up: both frames render again, alike.
    assert report["cache_after_off"] == [0, 0] and report["uncached"] == [0, len(FRAMES), 0]
    for frame in FRAMES:
        assert np.array_equal(arrays[f"uncached_{frame}"], arrays[f"again_{frame}"])
    for frame in FRAMES:
        assert np.array_equal(arrays[f"again_{frame}"], arrays[f"avatar_{frame}"])


def test_scene_geometry_in_front_occludes_the_avatar(main_run):
    _, arrays = main_run
    for frame in FRAMES:
        empty, avatar, cube, both = (arrays[f"{t}_{frame}"][..., :3] for t in ("empty", "avatar", "cube", "occluded"))
        cube_px = np.abs(cube - empty).max(-1) > 1e-4
        avatar_px = np.abs(avatar - empty).max(-1) > 1e-3
        assert (cube_px & avatar_px).sum() > 20, "the cube does not cover the avatar"
        assert np.abs(both[cube_px] - cube[cube_px]).max() < 1e-6       # the cube wins where it is
        rest = avatar_px & ~cube_px
        assert rest.sum() > 100 and np.abs(both[rest] - avatar[rest]).max() < 1e-6


def test_save_stores_relative_layers_and_bake_writes_every_frame(main_run):
    report, _ = main_run
    assert report["save"] == [["FINISHED"], None]
    uid = report["avatar"]["uid"]
    assert report["saved_image"] == [f"//hda_layers/avatar/{uid}/layer_0001.exr", "SEQUENCE"]
    assert report["bake"][0] == ["FINISHED"]
    assert report["baked_files"] == [f"layer_{f:04d}.exr" for f in range(1, 11)]


def test_reload_renders_identically_and_survives_undo(main_run, reload_run):
    _, arrays = main_run
    report, again = reload_run
    uid = main_run[0]["avatar"]["uid"]
    assert report["props"] == [True, uid, 3, "tiny", "", True, "HDA_Avatar_proxy"]
    for frame in FRAMES:
        assert _same_render(again[f"reload_{frame}"], arrays[f"avatar_{frame}"])
    assert report["undo"] == [["FINISHED"], None] and report["seed_after_undo"] == 3
    assert not _same_render(again["seed4_1"], again["reload_1"])  # another identity renders differently
    assert np.array_equal(again["undone_1"], again["reload_1"])


def test_a_farm_without_the_addon_renders_the_baked_layers(main_run, farm_run):
    _, arrays = main_run
    report, farm = farm_run
    assert not report["addon_loaded"]
    for frame in FRAMES:
        assert _same_render(farm[f"farm_{frame}"], arrays[f"avatar_{frame}"])


def test_two_avatars_have_their_own_identity_cache_and_layer(main_run):
    report, arrays = main_run
    config = load_config("tiny")
    sums = {}
    for seed in (3, 7):
        avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=seed)
        sums[seed] = float(sum(p.detach().double().sum() for p in avatar.unet.parameters()))
    assert report["checksum_3"] == pytest.approx(sums[3], abs=1e-9)
    assert report["checksum_7"] == pytest.approx(sums[7], abs=1e-9) and sums[3] != sums[7]
    assert len(report["cache_keys"]) == 2
    ours = [n for n in report["nodes_two"] if n.startswith("HDA Layer")]
    assert sorted(ours) == ["HDA Layer HDA_Avatar", "HDA Layer HDA_Avatar.001"]
    assert report["nodes_disabled"] == report["nodes_one"]  # disabling drops its chain at once
    one = np.abs(arrays["avatar_1"] - arrays["empty_1"]).max(-1) > 1e-3
    two = np.abs(arrays["two_1"] - arrays["empty_1"]).max(-1) > 1e-3
    assert (two & ~one).sum() > 300  # the second avatar, next to the first


def test_bad_avatar_files_are_reported_and_change_nothing(main_run):
    report, _ = main_run
    res, err = report["load_corrupt"]
    assert res is None and "not a readable safetensors file" in err and "corrupt.hda.safetensors" in err
    res, err = report["load_missing"]
    assert res is None and "avatar file not found" in err
    assert report["path_after_bad_load"] == ""
    res, err = report["add_corrupt"]
    assert res is None and "not a readable safetensors file" in err and report["objects_after_bad_add"] == 0
    # At render time the render fails: tests/test_blender_farm.py.


def test_disable_removes_every_handler_and_property(main_run):
    report, _ = main_run
    assert report["disable"] == ["FINISHED"]
    assert report["handlers_left"] == {} and not report["object_hda_left"]
    assert report["runtime_after_disable"] == [0, 0]


@pytest.mark.skipif(not BPY42_PYTHON.exists(), reason="no .venv-bpy42 (bpy==4.2.* for Blender 4.2 LTS)")
def test_key_render_on_blender_4_2(tmp_path, built_zip):  # noqa: F811
    # Blender 4.2's environment has no torch: the add-on finds it through its "Existing Environment"
    # preference, pointed at this project's venv (same Python 3.11 and numpy).
    site = next((REPO / ".venv" / "lib").glob("python3.*/site-packages"))
    report, arrays = _run(BPY42_PYTHON, "key", tmp_path, _dirs(tmp_path, BPY42_PYTHON), zip=str(built_zip),
                          python_path=str(site))
    assert report["version"][:2] == [4, 2]
    check_key_render(report, arrays)
    check_proxy_in_renders(report)
