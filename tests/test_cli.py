"""The `hda` command line: what it writes, and one-line errors for bad input."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hda_backend.avatar.io import save_avatar
from hda_backend.avatar.model import Avatar
from hda_backend.body import load_body
from hda_backend.cli import main
from hda_backend.config import load_config


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _alpha(path):
    return np.asarray(Image.open(path))[..., 3].astype(np.float32) / 255


def test_render_init_writes_a_posed_human(tmp_path, capsys):
    code, out, _ = _run(capsys, "render", "--init", "0", "--motion", "wave", "--frames", "3", "--size", "64",
                        "--camera", "front", "--preset", "tiny", "--out", str(tmp_path))
    assert code == 0, out
    frames = sorted(tmp_path.glob("frame_*.png"))
    assert [p.name for p in frames] == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
    assert (tmp_path / "contact_sheet.png").is_file()
    alpha = _alpha(frames[0])
    assert Image.open(frames[0]).mode == "RGBA"
    covered = alpha > 0.5
    assert 0.03 < covered.mean() < 0.6
    rows, cols = np.nonzero(covered)
    # A standing person filling the frame's height, centred, with one arm raised: taller than wide.
    assert rows.max() - rows.min() > 0.6 * 64
    assert rows.max() - rows.min() > cols.max() - cols.min()
    assert abs((cols.min() + cols.max()) / 2 - 32) < 10


def test_avatar_file_renders_like_its_init(tmp_path, capsys):
    config = load_config("tiny")
    avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=5)
    path = save_avatar(avatar, tmp_path / "a.hda.safetensors", origin="init:5")
    common = ["--motion", "squat", "--frames", "2", "--size", "48", "--preset", "tiny", "--shading", "flat"]
    assert _run(capsys, "render", "--avatar", str(path), *common, "--out", str(tmp_path / "a"))[0] == 0
    assert _run(capsys, "render", "--init", "5", *common, "--out", str(tmp_path / "b"))[0] == 0
    for name in ("frame_0000.png", "frame_0001.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name)))
    code, out, _ = _run(capsys, "info", str(path))
    assert code == 0 and "HDA avatar" in out and "init:5" in out and "UV:         32x32" in out


def test_info_describes_bodies_and_motions(tmp_path, capsys):
    from hda_backend.body import BUNDLED_BODY

    code, out, _ = _run(capsys, "info", str(BUNDLED_BODY))
    assert code == 0 and "55 SMPL-X joints" in out
    np.savez(tmp_path / "m.npz", poses=np.zeros((90, 165)), mocap_framerate=np.array(60.0))
    code, out, _ = _run(capsys, "info", str(tmp_path / "m.npz"))
    assert code == 0 and "90 frames at 60 fps (1.5 s)" in out


def _bad_inputs(tmp_path):
    nan_motion = tmp_path / "nan.npz"
    np.savez(nan_motion, poses=np.full((2, 165), np.nan))
    short_motion = tmp_path / "short.npz"
    np.savez(short_motion, poses=np.zeros((2, 99)))
    corrupt = tmp_path / "corrupt.hda.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    config = load_config("tiny")
    good = save_avatar(Avatar.from_init(load_body(), 32, config.unet, config.gaussians), tmp_path / "g.hda.safetensors")
    truncated = tmp_path / "trunc.hda.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    base = ["render", "--preset", "tiny", "--frames", "1", "--size", "32", "--out", str(tmp_path / "o")]
    return {
        "nan pose": (base + ["--init", "0", "--motion", str(nan_motion)], "NaN or inf"),
        "pose length": (base + ["--init", "0", "--motion", str(short_motion)], "99 values per frame, expected 165"),
        "missing motion": (base + ["--init", "0", "--motion", str(tmp_path / "none.npz")], "motion file not found"),
        "corrupt avatar": (base + ["--avatar", str(corrupt)], "not a readable safetensors file"),
        "truncated avatar": (base + ["--avatar", str(truncated)], "not a readable safetensors file"),
        "unknown preset": (["render", "--init", "0", "--preset", "huge", "--out", "o"], "preset 'huge': unknown"),
        "size 0": (["render", "--init", "0", "--size", "0", "--out", "o"], "--size 0: expected 1..8192"),
        "size huge": (["render", "--init", "0", "--size", "9000", "--out", "o"], "--size 9000: expected 1..8192"),
        "size text": (["render", "--init", "0", "--size", "big", "--out", "o"], "expected a whole number"),
        "no source": (["render", "--out", "o"], "one of the arguments --avatar --init is required"),
        "unknown command": (["dance"], "invalid choice"),
        "info missing": (["info", str(tmp_path / "nothing.npz")], "file not found"),
    }


CASES = ["nan pose", "pose length", "missing motion", "corrupt avatar", "truncated avatar", "unknown preset",
         "size 0", "size huge", "size text", "no source", "unknown command", "info missing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(case, tmp_path, capsys):
    argv, message = _bad_inputs(tmp_path)[case]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("hda: error: ") and err.count("\n") == 1, err
    assert message in err


def test_missing_body_file_says_how_to_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HDA_SMPLX_PATH", str(tmp_path / "SMPLX_NEUTRAL.npz"))
    code, _, err = _run(capsys, "render", "--init", "0", "--preset", "tiny", "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1
    assert "body model file not found" in err and "HDA_SMPLX_PATH" in err


def test_console_entry_point_exits_cleanly(tmp_path):
    """A real process: non-zero exit and no traceback on bad input; --help works."""
    run = subprocess.run([sys.executable, "-m", "hda_backend.cli", "render", "--init", "0", "--size", "-3",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "--size -3" in run.stderr
    helped = subprocess.run([sys.executable, "-m", "hda_backend.cli", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "render" in helped.stdout and "bench" in helped.stdout
