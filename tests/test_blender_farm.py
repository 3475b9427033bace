"""Render farms in real Blender: stale bakes are found, missing layers cannot pass for a correct frame,
a bad avatar file fails the render, every handler survives any engine, the person's colour under AgX.

Blender runs in child processes (tests/blender_farm_driver.py) with its user folders in a tmp folder
and the extension installed from the zip by Blender's own installer; the 4.2 LTS variant runs when
.venv-bpy42 exists, with torch from this project's environment (the scene tests' pattern).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hda_backend import bake_key
from tests.test_blender_extension import ADDON, BPY42_PYTHON, BPY50_PYTHON, REPO, _hermetic_env, built_zip  # noqa: F401

DRIVER = Path(__file__).with_name("blender_farm_driver.py")
CAMERA = {"location": [0.35, -4.6, 1.05], "rotation": [math.radians(88), 0.0, math.radians(3)], "lens": 45.0}
RESOLUTION, PERCENTAGE = (160, 128), 50   # renders at 80 x 64
PLANE = [1.7, 0.0, 1.9]                   # the AgX reference plane: in view, clear of the T-posed avatar
FRAMES = (1, 2, 3)
BAD_RENDER = "HDA-TEST: the render with a bad avatar file starts"   # the driver's marker on stderr
PYTHONS = [pytest.param(BPY50_PYTHON, id="blender5.0"),
           pytest.param(BPY42_PYTHON, id="blender4.2", marks=pytest.mark.skipif(
               not BPY42_PYTHON.exists(), reason="no .venv-bpy42 (bpy==4.2.* for Blender 4.2 LTS)"))]


def _run(python: Path, phase: str, root: Path, expect_rc: int = 0, **extra) -> tuple[dict, dict, str]:
    out = root / phase
    out.mkdir(parents=True, exist_ok=True)
    args = {"phase": phase, "addon": ADDON, "out": str(out), "camera": CAMERA, "resolution": RESOLUTION,
            "percentage": PERCENTAGE, "plane": PLANE, "a_blend": str(root / "scene" / "A.blend"),
            "b_blend": str(root / "scene" / "B.blend"), **extra}
    if python == BPY42_PYTHON:  # Blender 4.2's environment has no torch: the preferences' Existing Environment
        args["python_path"] = str(next((REPO / ".venv" / "lib").glob("python3.*/site-packages")))
    (out / "args.json").write_text(json.dumps(args))
    env = _hermetic_env(BLENDER_USER_RESOURCES=str(root / "user"), HOME=str(root / "home"),
                        NUMBA_CACHE_DIR=str(root / "numba"), HDA_CACHE_DIR=str(root / "cache"),
                        OMP_WAIT_POLICY="PASSIVE")
    env.pop("HDA_SMPLX_PATH", None)
    proc = subprocess.run([str(python), str(DRIVER), str(out / "args.json")], env=env, capture_output=True,
                          text=True, timeout=400, cwd=out)
    assert proc.returncode == expect_rc, (proc.stdout + proc.stderr)[-6000:]
    with np.load(out / "arrays.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads((out / "report.json").read_text()), arrays, proc.stderr


@pytest.fixture(scope="module", params=PYTHONS)
def farm_root(request, tmp_path_factory, built_zip):  # noqa: F811
    python = request.param
    root = tmp_path_factory.mktemp("farm")
    for name in ("scene", "user", "home", "numba", "cache"):
        (root / name).mkdir()
    stale = _run(python, "stale", root, zip=str(built_zip))
    return python, root, stale


def _check_blend(blend: Path) -> subprocess.CompletedProcess:
    env = _hermetic_env(PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE")
    env.pop("HDA_SMPLX_PATH", None)
    return subprocess.run([sys.executable, "-m", "hda_backend.cli", "check-blend", str(blend)], env=env,
                          capture_output=True, text=True, timeout=400)


def _lines(avatar: str, frames, reason: str) -> list[str]:
    return bake_key.summarize(avatar, {f: reason for f in frames})


# ----------------------------------------------------------------------------------------------- tests
def test_a_bake_is_keyed_to_everything_that_changes_its_pixels(farm_root):
    _, _, (r, _, _) = farm_root
    avatar = "HDA_Avatar"
    # Saved, not baked: frame 1 holds the compositor's placeholder, the rest have no file.
    assert r["unbaked"] == _lines(avatar, [1], bake_key.NOT_BAKED) + _lines(avatar, [2, 3], bake_key.MISSING)
    assert r["a_files"] == [f"layer_{f:04d}.exr" for f in FRAMES]
    assert r["baked"] == []
    assert r["camera_moved"] == _lines(avatar, FRAMES, bake_key.REASONS["camera"])
    assert r["camera_back"] == []
    # The key at frame 3 changed: frames 2 (interpolated) and 3 are stale, frame 1 is not.
    assert r["pose_changed"] == _lines(avatar, [2, 3], bake_key.REASONS["pose"])
    assert r["pose_back"] == []
    assert r["identity_changed"] == _lines(avatar, FRAMES, bake_key.REASONS["identity"])
    assert r["resolution_changed"] == _lines(avatar, FRAMES, bake_key.REASONS["identity"])
    assert r["restored"] == []


def test_each_saved_file_owns_its_layers(farm_root):
    _, _, (r, _, _) = farm_root
    # Save As B: B's compositor reads B's own folder, which is not baked yet; A's layers stay A's.
    assert r["b_image"] == f"//hda_layers/B/{r['uid']}/layer_0001.exr"
    assert r["save_as"] == (_lines("HDA_Avatar", [1], bake_key.NOT_BAKED)
                            + _lines("HDA_Avatar", [2, 3], bake_key.MISSING))
    assert r["b_baked"] == [] and r["a_untouched"]
    assert r["a_compressed"] == [True] * len(r["a_files"])  # Bake left its files final
    # Save Copy elsewhere leaves the open file B reading B's own baked layers, ready as before.
    assert r["save_copy"] == [True, r["b_image"], []]


def test_a_duplicated_avatar_gets_its_own_layers(farm_root):
    _, _, (r, _, _) = farm_root
    name, uid = r["copy"]
    assert name == "HDA_Avatar.001" and uid == r["uid"]   # Shift+D copies the uid...
    assert r["duplicated"][0].startswith(f"{name}: shares its uid with HDA_Avatar")
    assert r["copy_uid"] != r["uid"]                       # ...and the compositor sync gives it its own
    assert r["copy_files"] == r["b_original_files"] == [f"layer_{f:04d}.exr" for f in FRAMES]
    assert r["duplicate_baked"] == []


def test_check_blend_reports_stale_files_with_a_failing_exit_status(farm_root):
    python, root, _ = farm_root
    if python != BPY50_PYTHON:
        pytest.skip("hda check-blend runs this environment's bpy 5.0; on 4.2 the Check for Farm operator is tested")
    ready = _check_blend(root / "scene" / "A.blend")
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert "ready for the farm: scene 'Scene', 1 avatar(s), frames 1-3" in ready.stdout
    stale = _check_blend(root / "scene" / "B.blend")
    assert stale.returncode == 1, stale.stdout + stale.stderr
    reason = bake_key.REASONS["camera"]
    assert stale.stdout.splitlines() == [f"HDA_Avatar: frames 1-3: {reason}", f"HDA_Avatar.001: frames 1-3: {reason}"]
    assert "NOT ready for the farm: 2 problem(s)" in stale.stderr
    missing = _check_blend(root / "scene" / "nowhere.blend")
    assert missing.returncode == 2 and missing.stderr.strip().endswith("nowhere.blend: .blend file not found")


def test_a_farm_without_the_addon_paints_a_missing_layer_magenta(farm_root, tmp_path):
    python, root, _ = farm_root
    shutil.copy(root / "scene" / "A.blend", tmp_path / "A.blend")
    shutil.copytree(root / "scene" / "hda_layers" / "A", tmp_path / "hda_layers" / "A")
    uid = next(p.name for p in (tmp_path / "hda_layers" / "A").iterdir())
    os.remove(tmp_path / "hda_layers" / "A" / uid / "layer_0002.exr")
    r, farm, _ = _run(python, "farm", tmp_path, blend=str(tmp_path / "A.blend"))
    assert not r["addon_loaded"] and r["result"] == ["FINISHED"]
    magenta = np.array([1.0, 0.0, 1.0])
    assert np.abs(farm["farm_2"][..., :3] - magenta).max() < 1e-6        # every pixel: no layer for frame 2
    for frame in (1, 3):                                                 # the baked frames are the person
        assert (np.abs(farm[f"farm_{frame}"][..., :3] - magenta).max(-1) < 1e-3).sum() == 0


def test_check_blend_bad_input_is_one_line(tmp_path, capsys):
    from hda_backend.cli import main

    (tmp_path / "x.blend").write_bytes(b"BLENDER")
    assert main(["check-blend", str(tmp_path / "x.blend"), "--blender", str(tmp_path / "no-blender")]) == 2
    assert capsys.readouterr().err.strip() == (f"hda: error: --blender {tmp_path / 'no-blender'}: not an executable, "
                                               "expected a Blender binary")
    (tmp_path / "garbage.blend").write_bytes(b"not a blend file")
    assert main(["check-blend", str(tmp_path / "garbage.blend")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hda: error: {tmp_path / 'garbage.blend'}: ") and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def render_run(farm_root):
    python, root, _ = farm_root
    return (*_run(python, "render", root, expect_rc=1), root / "render")


def test_a_bad_avatar_file_fails_the_render_loudly(render_run):
    r, _, stderr, out = render_run
    (line,) = r["bad_check"][:1]
    assert line.startswith("HDA_Avatar: avatar ") and "corrupt.hda.safetensors: not a readable safetensors file" in line
    (status,) = r["bad_status"].values()                 # the sidebar's status line for the avatar
    assert "not a readable safetensors file" in status
    assert "bad_render_returned" not in r                # the render did not go on
    failure = [s for s in stderr.splitlines() if s.startswith("HDA Avatars: frame 1: HDA_Avatar: ")]
    assert failure and failure[-1].endswith("(render failed)") and "not a readable safetensors file" in failure[-1]
    assert not (out / "bad_0001.png").exists()


def test_handlers_survive_workbench_and_an_engine_without_depth(render_run):
    r, _, stderr, _ = render_run
    before_bad = stderr.split(BAD_RENDER)[0]
    assert BAD_RENDER in stderr and "Error in bpy.app.handlers" not in before_bad and "Traceback" not in before_bad
    assert r["workbench_pixels"] > 100                   # the person, depth-tested against Workbench's Z
    assert "HDA Front HDA_Avatar" in r["workbench_nodes"] and "HDA Missing HDA_Avatar" in r["workbench_nodes"]
    assert r["nodepth_pixels"] > 100                     # laid over the render: nothing can hide it
    assert "HDA Front HDA_Avatar" in r["eevee_nodes"]


def test_a_current_baked_layer_stands_in_when_the_backend_cannot_render(render_run):
    r, _, stderr, _ = render_run
    assert r["fallback_pixels"] > 100
    assert ("HDA Avatars: frame 1: HDA_Avatar: avatar device 'cuda': this torch has no CUDA device, expected device "
            "'cpu'; its baked layer is current and is used") in stderr


def test_the_person_is_scene_linear_radiance_under_agx(render_run):
    """The layer holds scene-linear radiance: under AgX the person's pixel is what Blender shows for an
    emission surface of the same linear radiance; under Standard it is that radiance sRGB-encoded
    (the backend's own colours); AgX shows it darker than Standard, as it shows the scene."""
    r, _, _, _ = render_run
    agx = r["agx"]
    radiance = np.array(agx["radiance"])
    assert radiance.max() > 0.05
    assert np.abs(np.array(agx["linear_plane"]) - radiance).max() < 1e-3     # the plane has that radiance
    assert np.abs(np.array(agx["AgX"]["person"]) - np.array(agx["AgX"]["plane"])).max() <= 2 / 65535 + 1e-3
    encoded = np.where(radiance <= 0.0031308, 12.92 * radiance, 1.055 * radiance ** (1 / 2.4) - 0.055)
    assert np.abs(np.array(agx["Standard"]["person"]) - encoded).max() < 2e-3
    assert np.array(agx["AgX"]["person"]).mean() < np.array(agx["Standard"]["person"]).mean() - 0.02
