"""The extension's periphery: fit in a subprocess, motion import, .ply export, identity sampling,
sidebar and viewport.

The fit runner (blender_addon/fitjob.py) is bpy-free and is tested here directly against real tiny
fits in child processes. Everything with bpy runs in one child process per test (a fresh Blender),
on the zip built and installed with Blender's own tools, as in test_blender_extension.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from blender_addon import deps, fitjob
from tests.test_blender_extension import _pid_alive, _wait_for

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    from tests.teacher import write_teacher_subject

    return write_teacher_subject(tmp_path_factory.mktemp("subject") / "teacher", cameras=2, size=32, train=2, test=1)


# ------------------------------------------------------------------------------ fit runner, no bpy
def test_fit_files_are_named_like_the_trainers(tmp_path):
    from hda_backend.fit.trainer import FitPaths

    ours = fitjob.FitFiles.for_output(tmp_path / "a.b.hda.safetensors")
    theirs = FitPaths.for_output(tmp_path / "a.b.hda.safetensors")
    assert (ours.avatar, ours.checkpoint, ours.metrics) == (theirs.avatar, theirs.checkpoint, theirs.metrics)
    with pytest.raises(ValueError, match="ending in .hda.safetensors"):
        fitjob.FitFiles.for_output(tmp_path / "a.safetensors")


def test_metrics_reader_reads_complete_rows_once_and_follows_a_rewrite(tmp_path):
    path = tmp_path / "m.metrics.jsonl"
    reader = fitjob.MetricsReader(path)
    assert reader.poll() == []
    path.write_bytes(b'{"step": 5, "psnr": 20.0}\n{"step": 10, "ps')
    assert reader.poll() == [{"step": 5, "psnr": 20.0}]
    with path.open("ab") as fh:
        fh.write(b'nr": 21.5}\n')
    assert reader.poll() == [{"step": 10, "psnr": 21.5}] and reader.poll() == []
    assert [r["step"] for r in reader.rows] == [5, 10]
    # A resume rewrites the file (temporary file + rename) with the rows up to its checkpoint.
    tmp = tmp_path / "new"
    tmp.write_bytes(b'{"step": 5, "psnr": 20.0}\n')
    os.replace(tmp, path)
    assert reader.poll() == [{"step": 5, "psnr": 20.0}] and [r["step"] for r in reader.rows] == [5]


def test_fit_command_runs_the_cli_with_blenders_module_path(tmp_path):
    argv, env = fitjob.fit_command("subj", tmp_path / "o.hda.safetensors", "/ext", preset="tiny", steps=7,
                                   python="/blender/python", sys_path=["/blender/lib", "/deps"], base_env={"PYTHONPATH": "x"})
    assert argv[:3] == ["/blender/python", "-c", fitjob.BOOT]
    assert argv[3:] == ["fit", "subj", "--out", str(tmp_path / "o.hda.safetensors"), "--resume",
                        "--preset", "tiny", "--steps", "7"]
    assert json.loads(env[fitjob.ENV_SYS_PATH]) == ["/ext", "/blender/lib", "/deps"]
    assert "PYTHONPATH" not in env and env["OMP_WAIT_POLICY"] == "PASSIVE"
    with pytest.raises(ValueError, match="preset 'huge'"):
        fitjob.fit_command("s", tmp_path / "o.hda.safetensors", "/ext", preset="huge")


def test_fit_in_a_subprocess_reports_progress_and_writes_a_loadable_avatar(tmp_path, subject):
    from hda_backend.avatar.io import load_avatar
    from hda_backend.body import load_body

    out = tmp_path / "fits" / "teacher.hda.safetensors"
    job = fitjob.start_fit(subject, out, REPO, preset="tiny")
    seen = set()
    end = time.monotonic() + 120
    while job.poll() == deps.RUNNING and time.monotonic() < end:
        seen.add(job.step)
        time.sleep(0.05)
    assert job.state == deps.DONE, job.job.lines[-5:]
    assert job.message.startswith(f"wrote {out} after 30 steps")
    assert (job.step, job.total, job.fraction) == (30, 30, 1.0)
    rows = [json.loads(line) for line in (tmp_path / "fits" / "teacher.metrics.jsonl").read_text().splitlines()]
    assert job.metrics.rows == rows and [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert job.psnr == rows[-1]["psnr"] and job.loss == rows[-1]["loss"]
    assert len(seen) > 1  # progress was visible while it ran
    avatar = load_avatar(out, load_body())
    assert avatar.uv_res == 32


def test_fit_errors_come_back_as_one_line(tmp_path):
    job = fitjob.start_fit(tmp_path / "nowhere", tmp_path / "o.hda.safetensors", REPO, preset="tiny")
    assert job.wait(timeout=120) == deps.FAILED
    assert job.message.startswith(f"{tmp_path / 'nowhere'}") and "\n" not in job.message
    assert "Traceback" not in job.message


def test_cancel_stops_the_fit_and_fitting_again_resumes_from_its_checkpoint(tmp_path, subject):
    out = tmp_path / "teacher.hda.safetensors"
    files = fitjob.FitFiles.for_output(out)
    job = fitjob.start_fit(subject, out, REPO, preset="tiny", steps=400)
    assert _wait_for(lambda: job.poll() == deps.RUNNING and files.checkpoint.exists(), 120), job.job.lines[-5:]
    pid = job.job._proc.pid
    job.cancel()
    assert job.wait(timeout=30) == deps.CANCELLED
    assert "keeps the progress: fit again to resume" in job.message
    assert _wait_for(lambda: not _pid_alive(pid), 10)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    assert not out.exists()
    from safetensors import safe_open

    with safe_open(str(files.checkpoint), framework="pt") as fh:
        saved = int(fh.metadata()["step"])
    assert saved >= 10 and saved % 10 == 0

    again = fitjob.start_fit(subject, out, REPO, preset="tiny", steps=400)
    assert _wait_for(lambda: again.poll() != deps.RUNNING or again.total, 120)
    assert again.total == 400 and again.step >= saved  # "resuming teacher at step <saved>/400"
    assert any(line.strip() == f"resuming teacher at step {saved}/400" for line in again.job.lines)
    again.cancel()
    assert again.wait(timeout=30) == deps.CANCELLED
