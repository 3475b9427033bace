"""The extension's periphery: fit in a subprocess, motion import, .ply export, identity sampling,
sidebar and viewport.

The fit runner (blender_addon/fitjob.py) is bpy-free and is tested here directly against real tiny
fits in child processes. Everything with bpy runs in one child process per test (a fresh Blender),
on the zip built and installed with Blender's own tools, as in test_blender_extension.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import types
from pathlib import Path

import numpy as np
import pytest

from blender_addon import deps, fitjob
from hda_backend.preview import AHEAD_MATCH_RAD
from tests.test_blender_extension import ADDON, BPY42_PYTHON, BPY50_PYTHON, _hermetic_env, _pid_alive, _wait_for
from tests.test_blender_extension import built_zip  # noqa: F401 - the zip fixture, built once per module

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
                                   python="/blender/python", sys_path=["/blender/lib", "/deps"],
                                   base_env={"PYTHONPATH": "x"}, numba_cache="/user/numba_fit")
    assert argv[:3] == ["/blender/python", "-c", fitjob.BOOT]
    assert argv[3:] == ["fit", "subj", "--out", str(tmp_path / "o.hda.safetensors"), "--resume",
                        "--preset", "tiny", "--steps", "7"]
    assert json.loads(env[fitjob.ENV_SYS_PATH]) == ["/ext", "/blender/lib", "/deps"]
    assert "PYTHONPATH" not in env and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["NUMBA_CACHE_DIR"] == "/user/numba_fit"  # never Blender's: see fit_command
    with pytest.raises(ValueError, match="preset 'huge'"):
        fitjob.fit_command("s", tmp_path / "o.hda.safetensors", "/ext", preset="huge")


def test_fit_in_a_subprocess_reports_progress_and_writes_a_loadable_avatar(tmp_path, subject):
    from hda_backend.avatar.io import load_avatar
    from hda_backend.body import load_body

    out = tmp_path / "fits" / "teacher.hda.safetensors"
    job = fitjob.start_fit(subject, out, REPO, preset="tiny")
    seen, ticks = set(), []
    end = time.monotonic() + 120
    while time.monotonic() < end:
        t0 = time.perf_counter()
        state = job.poll()  # what the modal operator's timer tick does
        ticks.append(time.perf_counter() - t0)
        if state != deps.RUNNING:
            break
        seen.add(job.step)
        time.sleep(0.05)
    print(f"poll while fitting: max {1e3 * max(ticks):.2f} ms, median {1e3 * sorted(ticks)[len(ticks) // 2]:.3f} ms "
          f"over {len(ticks)} polls")
    assert job.state == deps.DONE, job.job.lines[-5:]
    assert job.message.startswith(f"wrote {out} after 30 steps")
    assert (job.step, job.total, job.fraction) == (30, 30, 1.0)
    rows = [json.loads(line) for line in (tmp_path / "fits" / "teacher.metrics.jsonl").read_text().splitlines()]
    assert job.metrics.rows == rows and [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert job.psnr == rows[-1]["psnr"] and job.loss == rows[-1]["loss"]
    assert len(seen) > 1  # progress was visible while it ran
    avatar = load_avatar(out, load_body())
    assert avatar.uv_res == 32


def test_fit_status_names_the_stage_of_the_progress_bar(tmp_path):
    """The trainer's three bars (fit/trainer.py: 'maps', 'regress', 'fit') read back as stages."""
    running = types.SimpleNamespace(running=True)  # the child process, as the status sees it
    job = fitjob.FitJob(running, fitjob.FitFiles.for_output(tmp_path / "a.hda.safetensors"),
                        fitjob.MetricsReader(tmp_path / "a.metrics.jsonl"))
    assert job.status() == "starting the fit..."
    job._describe("compiling 8 numba kernels in a child process, once, so that every fit runs numba's cached code")
    assert job.status() == "compiling the rasterizer's kernels (once)..."
    for line, stage, step, total in (
            ("maps teacher:  53%|█████▎    | 530/1000 [00:10<00:09, 50.0step/s, psnr=22.09]", "colour maps", 530, 1000),
            ("regress teacher:  20%|██        | 120/600 [00:30<01:30, 4.0step/s]", "UNet regression", 120, 600),
            ("fit teacher:   5%|▌         | 30/600 [00:07<02:20, 4.1step/s]", "end to end", 30, 600),
            ("resuming teacher at step 100/600", "end to end", 100, 600)):
        job._describe(line)
        assert (job.stage, job.step, job.total) == (stage, step, total)
    job._describe("LPIPS off: weight 0")  # not a bar: nothing changes
    assert (job.stage, job.step) == ("end to end", 100)


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


# ------------------------------------------------------------------------------ motion keys, no bpy
def test_zup_motion_re_expressed_in_the_body_frame_poses_the_same_body_turned():
    """A +Z-up motion converted to +Y up poses every vertex at C·x (C: Z-up -> Y-up), by real LBS."""
    import torch

    from hda_backend import motion_keys, rig
    from hda_backend.body import load_body, pose_body

    body = load_body()
    rng = np.random.default_rng(1)
    pose, transl = rng.normal(0, 0.3, (3, 55, 3)), rng.normal(0, 0.5, (3, 3))
    pose[:, 0] = rig.quaternion_to_axis_angle(rig.matrix_to_quaternion(
        rig.axis_angle_to_matrix(np.array([np.pi / 2, 0, 0])) @ rig.axis_angle_to_matrix(pose[:, 0])))
    assert motion_keys.root_up_axis(pose) == "Z" and motion_keys.root_up_axis(np.zeros((2, 55, 3))) == "Y"
    new_pose, new_transl = motion_keys.zup_to_yup(pose, transl, body.rest_joints()[0].double().numpy())
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)
    before = pose_body(body, as_t(pose), transl=as_t(transl)).vertices.double().numpy()
    after = pose_body(body, as_t(new_pose), transl=as_t(new_transl)).vertices.double().numpy()
    assert np.abs(after - before @ rig.AXIS_ZUP_TO_YUP.T).max() < 1e-4
    assert motion_keys.root_up_axis(new_pose) == "Y"


def test_resampling_a_steady_rotation_hits_the_exact_rotation_at_scene_frames():
    from hda_backend import motion_keys, rig

    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    t60 = np.arange(61) / 60.0  # one second at 60 fps, 2 rad/s about one axis
    quats = rig.matrix_to_quaternion(rig.axis_angle_to_matrix(axis * 2.0 * t60[:, None]))[:, None]
    locs = np.stack([t60, t60 ** 2, np.zeros_like(t60)], 1)
    q24, l24 = motion_keys.resample_tracks(quats, locs, 60.0, 24.0)
    assert q24.shape == (25, 1, 4) and len(motion_keys.resample_times(61, 60.0, 24.0)) == 25
    t24 = np.arange(25) / 24.0
    want = rig.matrix_to_quaternion(rig.axis_angle_to_matrix(axis * 2.0 * t24[:, None]))
    assert np.abs(np.abs((q24[:, 0] * want).sum(-1)) - 1).max() < 1e-9  # slerp is exact for steady spin
    assert np.allclose(l24[:, 0], t24) and np.abs(l24[:, 1] - t24 ** 2).max() < (1 / 60) ** 2
    assert np.allclose(motion_keys.fcurve_coords(np.array([1.0, 2.0]), np.array([5.0, 6.0])), [1, 5, 2, 6])


# ------------------------------------------------------------------------------------ inputs for bpy
def write_bvh(path: Path, rest_joints: np.ndarray, pose: np.ndarray, transl: np.ndarray, fps: float) -> Path:
    """A BVH of the SMPL-X skeleton written by hand: offsets from the rest joints (body frame, Y up),
    the root's position channels = pelvis position, ZXY Euler channels in degrees, rest = T-pose."""
    from hda_backend import rig
    from hda_backend.body.skeleton import JOINT_NAMES, PARENTS

    children = {j: [c for c in range(55) if PARENTS[c] == j] for j in range(55)}
    lines, order = ["HIERARCHY"], []  # channel values follow the hierarchy's depth-first order

    def node(j, depth):
        order.append(j)
        ind = "  " * depth
        off = rest_joints[j] - (rest_joints[PARENTS[j]] if PARENTS[j] >= 0 else 0)
        lines.extend([f"{ind}{'ROOT' if j == 0 else 'JOINT'} {JOINT_NAMES[j]}", f"{ind}{{",
                      f"{ind}  OFFSET {off[0]:.6f} {off[1]:.6f} {off[2]:.6f}",
                      f"{ind}  CHANNELS " + ("6 Xposition Yposition Zposition " if j == 0 else "3 ")
                      + "Zrotation Xrotation Yrotation"])
        for c in children[j]:
            node(c, depth + 1)
        if not children[j]:
            lines.extend([f"{ind}  End Site", f"{ind}  {{", f"{ind}    OFFSET 0.000000 0.050000 0.000000", f"{ind}  }}"])
        lines.append(f"{ind}}}")

    node(0, 0)
    m = rig.axis_angle_to_matrix(pose)  # R = Rz Rx Ry for the channel order Z X Y
    euler = np.degrees(np.stack([np.arctan2(-m[..., 0, 1], m[..., 1, 1]), np.arcsin(np.clip(m[..., 2, 1], -1, 1)),
                                 np.arctan2(-m[..., 2, 0], m[..., 2, 2])], -1))
    lines += ["MOTION", f"Frames: {pose.shape[0]}", f"Frame Time: {1.0 / fps:.8f}"]
    for f in range(pose.shape[0]):
        values = list(rest_joints[0] + transl[f]) + list(euler[f, order].reshape(-1))
        lines.append(" ".join(f"{v:.6f}" for v in values))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def diffusion_model(tmp_path_factory) -> Path:
    """A tiny diffusion model trained here on three tiny avatars (seconds)."""
    import torch

    from hda_backend.avatar.io import save_avatar
    from hda_backend.avatar.model import Avatar
    from hda_backend.body import load_body
    from hda_backend.config import load_config
    from hda_backend.diffusion.train import train_diffusion

    folder = tmp_path_factory.mktemp("diffusion")
    config = load_config("tiny")
    body = load_body()
    for i in range(3):
        avatar = Avatar.from_init(body, config.uv.res, config.unet, config.gaussians, seed=0)
        with torch.no_grad():
            avatar.unet.outc.bias[11:14] = torch.tensor([0.3, -0.2, 0.1]) * (i - 1)
        save_avatar(avatar, folder / "fits" / f"a{i}.hda.safetensors", origin=f"test:{i}")
    out = folder / "tiny.diffusion.safetensors"
    train_diffusion(folder / "fits", out, config.diffusion, steps=4, progress=False, log=lambda _: None)
    return out


# ------------------------------------------------------------------------------------ real Blender
_DRIVER = r'''
import json, os, sys, time
from types import SimpleNamespace
args = json.loads(sys.argv[1])
import bpy
import numpy as np

ADDON = args["addon"]
report = {"seconds": {}}
_t = [time.perf_counter()]


def mark(name):
    now = time.perf_counter()
    report["seconds"][name] = round(now - _t[0], 2)
    _t[0] = now


def mod(name):
    import importlib
    return importlib.import_module(f"{ADDON}.{name}")


def call(op, **kw):
    try:
        return sorted(op(**kw)), None
    except RuntimeError as exc:  # an operator's ERROR report
        return None, str(exc).strip()


handlers_before = {n: len(getattr(bpy.app.handlers, n)) for n in dir(bpy.app.handlers)
                   if not n.startswith("_") and isinstance(getattr(bpy.app.handlers, n), list)}
bpy.ops.extensions.package_install_files(filepath=args["zip"], repo="user_default", enable_on_install=True)
if args.get("env_site"):  # the backend from an existing environment (the preferences' option)
    bpy.context.preferences.addons[ADDON].preferences.python_path = args["env_site"]
report["version"] = list(bpy.app.version)
motion_op, export_op, fit_op, identity_op = (mod("operators.motion"), mod("operators.export"),
                                             mod("operators.fit"), mod("operators.identity"))
viewport, runtime, ui = mod("blender_addon.viewport"), mod("blender_addon.runtime"), mod("blender_addon.ui")
session = mod("blender_addon.session")
rig = mod("hda_backend.rig")
report["ops"] = sorted(dir(bpy.ops.hda))
report["panels"] = sorted(t for t in dir(bpy.types) if t.startswith("HDA_PT"))

# --- viewport: nothing in background mode; the handler is added and removed when allowed -------
report["vp_background_handle"] = session.viewport.handle
viewport._background = lambda: False
viewport.register()
handle = session.viewport.handle
viewport.unregister()
try:
    bpy.types.SpaceView3D.draw_handler_remove(handle, 'WINDOW')
    report["vp_removed"] = False
except ValueError:
    report["vp_removed"] = handle is not None and session.viewport.handle is None
viewport._background = lambda: bpy.app.background

mark('install_and_enable')
scene = bpy.context.scene
scene.render.fps, scene.render.fps_base = 30, 1.0
report["add"] = call(bpy.ops.hda.add_avatar)
obj = bpy.context.active_object
obj.hda.uv_preset = "tiny"
obj.location = (0.4, -0.2, 0.9)
obj.rotation_euler = (0.0, 0.0, 0.5)
avatar = runtime.get_avatar(obj)
layout = runtime.get_layout(avatar.body)

# --- motion: SMPL-X npz at 60 fps onto a 30 fps scene (resampled), then the scene's fps set ------
data = np.load(args["npz"])
pose60, transl60 = data["poses"].reshape(-1, 55, 3), data["trans"]
scene.frame_set(1)
report["npz"] = call(bpy.ops.hda.import_motion, filepath=args["npz"], frame_start=1)
fcurves = mod("blender_addon.playback").object_fcurves(obj)
report["fcurves"] = len(fcurves)
report["keys"] = sorted({len(fc.keyframe_points) for fc in fcurves})
report["interp"] = sorted({k.interpolation for fc in fcurves for k in fc.keyframe_points})
report["range"] = [scene.frame_start, scene.frame_end, scene.render.fps]
quats, locs = rig.bone_rotations_from_pose(pose60, transl60, layout)
errs, pose_errs = [], []
for k in (0, 3, 7):  # scene frame 1 + k is motion frame 2k exactly
    got = np.array([[fc.evaluate(1 + k) for fc in fcurves if fc.data_path == f'pose.bones["{n}"].rotation_quaternion']
                    for n in layout.names])
    ref = quats[2 * k]
    errs.append(float(np.minimum(np.abs(got - ref).max(-1), np.abs(got + ref).max(-1)).max()))
    scene.frame_set(1 + k)
    pose, transl = runtime.read_pose(obj, bpy.context.evaluated_depsgraph_get(), layout)
    r_got = rig.axis_angle_to_matrix(pose.reshape(55, 3))
    r_ref = rig.axis_angle_to_matrix(pose60[2 * k])
    pose_errs.append([float(np.abs(r_got - r_ref).max()), float(np.abs(transl - transl60[2 * k]).max())])
report["key_err"], report["pose_err"] = errs, pose_errs

# --- playback look-ahead: the action's keys through Blender's armature formula, against Blender's own
# evaluation of the frame; a constraint the keys do not show stops it; direction and looping.
playback = mod("blender_addon.playback")


def evaluated_pose(frame):
    scene.frame_set(frame)
    return runtime.read_pose(obj, bpy.context.evaluated_depsgraph_get(), layout)[0]


frames = (1, 4, 8, scene.frame_end)
predicted = playback.predict_poses(obj, frames, layout)
report["predict_err"] = float(max(np.abs(predicted[i] - evaluated_pose(f)).max() for i, f in enumerate(frames)))
report["frame_ahead"] = [playback.frame_ahead(scene, f, s) for f, s in ((4, 2), (scene.frame_end, 2), (1, -2))]
report["direction"] = [playback.direction(scene, a, b) for a, b in ((4, 5), (5, 4), (scene.frame_end, 1), (1, 1))]
now = evaluated_pose(4)
ahead, predicts = playback.ahead_pose(obj, scene, now, layout, 2)
report["ahead_err"] = [float(np.abs(ahead - evaluated_pose(6)).max()), predicts]
scene.frame_set(4)
limit = obj.pose.bones[layout.names[1]].constraints.new('LIMIT_ROTATION')
limit.use_limit_x = limit.use_limit_y = limit.use_limit_z = True
now = evaluated_pose(4)
playing = SimpleNamespace(scene=scene, screen=SimpleNamespace(is_animation_playing=True))
report["ahead_constrained"] = [playback.ahead_pose(obj, scene, now, layout, 2) == (None, False),
                               viewport.look_ahead(playing, obj, now, "c") is None, session.viewport.ahead.get("c")]
predict_calls, predict = [], playback.predict_poses
playback.predict_poses = lambda *a: predict_calls.append(a[1]) or predict(*a)
# A loop played once looks ahead where the keys alone do not (the poses Blender evaluated, kept per frame).
scene.use_preview_range, scene.frame_preview_start, scene.frame_preview_end = True, 4, 6
pose6 = evaluated_pose(6)
report["loop_ahead"] = []
for frame in (4, 5, 6, 4):  # the preview range played, then looped back to its start
    got = viewport.look_ahead(playing, obj, evaluated_pose(frame), "c")
    report["loop_ahead"].append(None if got is None else float(np.abs(got - pose6).max()))
report["loop_ahead_flag"] = session.viewport.ahead.get("c")
# The keys found not to give the pose are not evaluated again while it plays; stopped and played again, they are.
report["predict_calls"] = [len(predict_calls)]
stopped = SimpleNamespace(scene=scene, screen=SimpleNamespace(is_animation_playing=False))
viewport.look_ahead(stopped, obj, evaluated_pose(5), "c")
viewport.look_ahead(playing, obj, evaluated_pose(5), "c")
report["predict_calls"].append(len(predict_calls))
playback.predict_poses = predict
edited = evaluated_pose(5) + 1e-3                    # the pose on screen moved since the loop kept it
report["loop_edited"] = [viewport.look_ahead(playing, obj, edited, "c") is None, session.viewport.ahead.get("c"),
                         bool(np.abs(session.viewport.played["c"][5] - edited).max() < 1e-6)]
saved_max, playback.PLAYED_MAX = playback.PLAYED_MAX, 2
bound = {}
for frame in (1, 2, 3):                             # full at two frames: a new one starts again
    playback.played_ahead(bound, SimpleNamespace(frame_current=frame, use_preview_range=False, frame_start=1,
                                                 frame_end=31), np.zeros(165), 2)
report["played_bound"] = sorted(bound)
playback.PLAYED_MAX = saved_max
scene.use_preview_range = False
obj.pose.bones[layout.names[1]].constraints.remove(limit)
session.viewport.frames.clear()
looked = []
for frame, expect in ((4, 6), (5, 7), (4, 2)):  # forwards, then one frame back: backwards
    now = evaluated_pose(frame)
    looked.append(float(np.abs(viewport.look_ahead(playing, obj, now, "k") - evaluated_pose(expect)).max()))
report["look_ahead_err"] = looked
report["ahead_flag"] = [session.viewport.ahead.get("k")]
report["look_ahead_stopped"] = viewport.look_ahead(stopped, obj, evaluated_pose(4), "k") is None
report["ahead_flag"].append("k" in session.viewport.ahead)

mark('add_avatar_and_npz_import')
report["npz_fps"] = call(bpy.ops.hda.import_motion, filepath=args["npz"], fps_mode="SCENE_FPS", frame_start=1)
report["keys_fps"] = sorted({len(fc.keyframe_points) for fc in mod("blender_addon.playback").object_fcurves(obj)})
report["range_fps"] = [scene.frame_start, scene.frame_end, scene.render.fps, scene.render.fps_base]
scene.render.fps, scene.render.fps_base = 30, 1.0

# AMASS layout, +Z up world: stands up in Blender (the body's up along the armature's +Z).
report["amass"] = call(bpy.ops.hda.import_motion, filepath=args["amass"], frame_start=1)
scene.frame_set(1)
pose, transl = runtime.read_pose(obj, bpy.context.evaluated_depsgraph_get(), layout)
root = rig.axis_angle_to_matrix(pose[:3])
report["amass_up_in_armature"] = (rig.AXIS_YUP_TO_ZUP @ root @ np.array([0.0, 1.0, 0.0])).tolist()
amass = np.load(args["amass"])
r0 = rig.axis_angle_to_matrix(amass["poses"][0, :3])
report["amass_root_err"] = float(np.abs(rig.AXIS_YUP_TO_ZUP @ root - r0).max())  # armature axes = AMASS world axes

# BVH with SMPL-X names through Blender's BVH importer.
objects_before = len(bpy.data.objects)
report["bvh"] = call(bpy.ops.hda.import_motion, filepath=args["bvh"], frame_start=1)
report["bvh_objects_left"] = len(bpy.data.objects) - objects_before
report["bvh_active"] = bpy.context.active_object.name == obj.name
bvh_pose = np.load(args["bvh_ref"])
bvh_errs = []
for f in (0, 2, 4):
    scene.frame_set(1 + f)
    pose, transl = runtime.read_pose(obj, bpy.context.evaluated_depsgraph_get(), layout)
    r_got = rig.axis_angle_to_matrix(pose.reshape(55, 3))
    r_ref = rig.axis_angle_to_matrix(bvh_pose["pose"][f])
    bvh_errs.append([float(np.abs(r_got - r_ref).max()), float(np.abs(transl - bvh_pose["transl"][f]).max())])
report["bvh_err"] = bvh_errs

for name in ("corrupt_npz", "missing", "nan_npz", "bad_bvh"):
    report[name] = call(bpy.ops.hda.import_motion, filepath=args[name])

mark('other_motion_imports')
# --- export: the current frame, then a range --------------------------------------------------
report["npz_again"] = call(bpy.ops.hda.import_motion, filepath=args["npz"], frame_start=1)
scene.frame_set(4)
report["export"] = call(bpy.ops.hda.export_ply, filepath=os.path.join(args["tmp"], "one.ply"))
report["export_range"] = call(bpy.ops.hda.export_ply, filepath=os.path.join(args["tmp"], "seq.ply"),
                              frames="RANGE", frame_start=2, frame_end=3, coords="BODY")
report["frame_after_export"] = scene.frame_current
world = export_op.world_matrix(obj, bpy.context.evaluated_depsgraph_get())
np.save(os.path.join(args["tmp"], "world.npy"), world)
obj.scale = (1.0, 2.0, 1.0)
report["export_shear"] = call(bpy.ops.hda.export_ply, filepath=os.path.join(args["tmp"], "bad.ply"))
obj.scale = (1.0, 1.0, 1.0)

if args["full"]:  # version-independent parts (backend and subprocess logic): once
    # --- identity: no model, then a tiny model; the slider; a corrupt model ------------------------
    report["identity_default"] = call(bpy.ops.hda.sample_identity)  # no model given: the bundled default
    report["identity_default_seed"] = obj.hda.seed
    report["identity_default_file"] = bpy.path.abspath(obj.hda.avatar_path)
    obj.hda.seed, obj.hda.seed_b, obj.hda.identity_mix = 5, 7, 0.0
    report["identity"] = call(bpy.ops.hda.sample_identity, model=args["model"], steps=3)
    report["identity_file"] = bpy.path.abspath(obj.hda.avatar_path)
    report["identity_loaded"] = runtime.get_avatar(obj).uv_res
    obj.hda.identity_mix = 0.5
    report["identity_mix"] = call(bpy.ops.hda.sample_identity, model=args["model"], steps=3)
    report["identity_mix_file"] = bpy.path.abspath(obj.hda.avatar_path)
    report["identity_random"] = call(bpy.ops.hda.sample_identity, model=args["model"], steps=3, random=True)
    report["identity_random_seed"] = obj.hda.seed
    before = obj.hda.avatar_path
    report["identity_corrupt"] = call(bpy.ops.hda.sample_identity, model=args["corrupt_avatar"])
    report["identity_kept"] = obj.hda.avatar_path == before

mark('export_and_identity')
# --- a corrupt avatar file gives a report, not an exception ------------------------------------
obj.hda.avatar_path = args["corrupt_avatar"]
report["export_corrupt"] = call(bpy.ops.hda.export_ply, filepath=os.path.join(args["tmp"], "c.ply"))
obj.hda.avatar_path = ""

if args["full"]:
    # --- fit: synchronous in background; the modal logic through its step function ---------------
    report["fit_nosubject"] = call(bpy.ops.hda.fit_subject, subject=args["tmp"], preset="tiny")
    bpy.context.window_manager.hda_fit.subject = args["subject"]
    bpy.context.window_manager.hda_fit.preset = "tiny"
    report["fit"] = call(bpy.ops.hda.fit_subject)
    report["fit_path"] = bpy.path.abspath(obj.hda.avatar_path)
    report["fit_line"] = session.fit.line
    report["fit_loaded"] = runtime.get_avatar(obj).uv_res
    path_before = obj.hda.avatar_path
    job = fit_op.start(bpy.context, obj, args["subject"], preset="tiny", steps=400,
                       output=os.path.join(args["tmp"], "modal.hda.safetensors"))
    report["fit_poll_running"] = bpy.ops.hda.fit_subject.poll()
    ticks = []
    while True:
        t0 = time.perf_counter()
        state = fit_op.step(bpy.context)
        ticks.append(time.perf_counter() - t0)
        if state != "RUNNING":
            break
        if bpy.ops.hda.cancel_fit.poll():  # the Cancel button (resuming is tested on the runner itself)
            bpy.ops.hda.cancel_fit()
        time.sleep(0.05)
    report["fit_cancel"] = [state, session.fit.line, obj.hda.avatar_path == path_before]
    report["fit_tick_ms"] = [1e3 * max(ticks), 1e3 * float(np.median(ticks)), len(ticks)]

mark('fit_with_numba_jit_in_child')
# --- viewport camera (pure) and the offscreen draw with a GPU context -------------------------
cam_data = bpy.data.cameras.new("cam")
cam = bpy.data.objects.new("cam", cam_data)
scene.collection.objects.link(cam)
cam.location = (0.9, -3.5, 1.6)
cam.rotation_euler = (1.35, 0.0, 0.25)
cam_data.shift_x = 0.05
scene.camera = cam
scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 64, 48, 100
scene.frame_set(3)
depsgraph = bpy.context.evaluated_depsgraph_get()
proj = np.array(cam.calc_matrix_camera(depsgraph, x=64, y=48))
obj_m = np.array(obj.matrix_world)
vm, K, shift = rig.viewport_camera(np.linalg.inv(np.array(cam.matrix_world)), proj, 64, 48, obj_m)
vm_ref, K_ref = rig.camera_from_blender(np.array(cam.matrix_world), proj, 64, 48, obj_m)
report["vp_persp"] = [float(np.abs(vm - vm_ref).max()), float(np.abs(K - K_ref).max()), shift]
# An orthographic view: pixels and depths of points through the pinhole stand-in vs the true ortho map.
cam_data.type = 'ORTHO'
cam_data.ortho_scale = 2.5
ortho = np.array(cam.calc_matrix_camera(bpy.context.evaluated_depsgraph_get(), x=64, y=48))
report["ortho_w"] = float(ortho[3, 3])
vm, K, shift = rig.viewport_camera(np.linalg.inv(np.array(cam.matrix_world)), ortho, 64, 48, obj_m)
pts_body = np.random.default_rng(0).normal(0, 0.4, (50, 3)) + np.array([0.0, -0.3, 0.0])
pts_world = (obj_m @ np.c_[rig.to_blender(pts_body), np.ones(50)].T).T
view = np.linalg.inv(np.array(cam.matrix_world)) @ pts_world.T
ndc = ortho @ view
px_true = np.stack([(ndc[0] + 1) * 32, (1 - ndc[1]) * 24], 1)
cv = vm @ np.c_[pts_body, np.ones(50)].T
px_ours = (K @ cv[:3]).T
px_ours = px_ours[:, :2] / px_ours[:, 2:]
depth_true = rig.ndc_depth(view[2], ortho)
depth_ours = rig.ndc_depth(shift - cv[2], ortho)
report["vp_ortho"] = [float(np.abs(px_true - px_ours).max()), float(np.abs(depth_true - depth_ours).max())]
cam_data.type = 'PERSP'
depsgraph = bpy.context.evaluated_depsgraph_get()

obj.hda.shading = "FLAT"
request, shift = viewport.request_for(obj, depsgraph, viewport.read_pose(obj, depsgraph),
                                     np.linalg.inv(np.array(cam.matrix_world)), proj, 64, 48)
rgba, depth = mod("hda_backend.preview").render_preview(request)
np.save(os.path.join(args["tmp"], "layer_rgba.npy"), rgba)
np.save(os.path.join(args["tmp"], "layer_depth.npy"), depth)
np.save(os.path.join(args["tmp"], "proj.npy"), proj)
covered = depth < 1e9
clear_depth = float(np.median(rig.ndc_depth(-depth[covered], proj))) if covered.any() else 0.5
report["clear_depth"] = clear_depth


class OffscreenProbe(bpy.types.RenderEngine):
    bl_idname = "HDA_TEST_OFFSCREEN"
    bl_label = "offscreen probe"
    bl_use_gpu_context = True

    def render(self, depsgraph):
        import gpu
        try:
            off = gpu.types.GPUOffScreen(64, 48, format='RGBA32F')
            with off.bind():
                fb = gpu.state.active_framebuffer_get()
                fb.clear(color=(0.2, 0.3, 0.4, 1.0), depth=clear_depth)
                uploaded = viewport.upload(rgba, depth)
                report["vp_rect"] = list(uploaded[2])
                report["vp_empty"] = viewport.upload(np.zeros_like(rgba), np.full_like(depth, 1e10)) is None
                viewport.draw_layer(uploaded, rig.depth_terms(proj), 0.0)
                color = np.array(fb.read_color(0, 0, 64, 48, 4, 0, 'FLOAT').to_list(), dtype=np.float32)
                zbuf = np.array(fb.read_depth(0, 0, 64, 48).to_list(), dtype=np.float32)
            off.free()
            # The draw handler itself, through its worker, with a stand-in context (background Blender
            # has no region): the first draw asks the worker, the next one draws what it finished.
            from types import SimpleNamespace
            region = SimpleNamespace(width=64, height=48, as_pointer=lambda: 1)
            fake = SimpleNamespace(region=region, scene=bpy.context.scene, window_manager=None,
                                   screen=SimpleNamespace(is_animation_playing=False),
                                   region_data=SimpleNamespace(view_matrix=np.linalg.inv(np.array(cam.matrix_world)),
                                                               window_matrix=proj),
                                   evaluated_depsgraph_get=lambda: depsgraph)
            viewport.bpy = SimpleNamespace(context=fake, app=bpy.app)
            asked, real_request_for = [], viewport.request_for
            viewport.request_for = lambda *a: (asked.append(a[7]), real_request_for(*a))[1]  # records lod
            try:
                off = gpu.types.GPUOffScreen(64, 48, format='RGBA32F')
                with off.bind():
                    fb = gpu.state.active_framebuffer_get()
                    fb.clear(color=(0.2, 0.3, 0.4, 1.0), depth=clear_depth)
                    viewport._draw()
                    first = np.array(fb.read_color(0, 0, 64, 48, 4, 0, 'FLOAT').to_list(), dtype=np.float32)
                    workers = list(session.viewport.workers.values())
                    report["vp_worker_threads"] = sorted({t.name for w in workers for t in w._threads})
                    report["vp_worker_idle"] = all(w.wait(lambda w: w.idle(), 120) for w in workers)
                    viewport._draw()
                    second = np.array(fb.read_color(0, 0, 64, 48, 4, 0, 'FLOAT').to_list(), dtype=np.float32)
                    # Fast Playback Preview off: a moving pose asks for full quality (no level of detail).
                    prefs = bpy.context.preferences.addons[ADDON].preferences
                    prefs.playback_lod = False
                    for part in (session.viewport.drawn, session.viewport.requested, session.viewport.last_pose):
                        part.clear()
                    viewport._draw()
                    prefs.playback_lod = True
                    report["vp_lod_asked"] = asked
                off.free()
            finally:
                viewport.bpy = bpy
                viewport.request_for = real_request_for
            report["vp_worker_first"] = float(np.abs(first.reshape(-1, 4) - [0.2, 0.3, 0.4, 1.0]).max())
            report["vp_worker_vs_direct"] = float(np.abs(second - color).max())
            report["vp_worker_errors"] = dict(session.caches.errors)
            np.save(os.path.join(args["tmp"], "gpu_color.npy"), color.reshape(48, 64, 4))
            np.save(os.path.join(args["tmp"], "gpu_depth.npy"), zbuf.reshape(48, 64))
            report["gpu"] = [gpu.platform.renderer_get(), gpu.platform.backend_type_get()]
        except Exception as exc:
            report["gpu"] = [f"{type(exc).__name__}: {exc}"]
        result = self.begin_result(0, 0, 4, 4)
        self.end_result(result)


bpy.utils.register_class(OffscreenProbe)
engine = scene.render.engine
scene.render.engine = "HDA_TEST_OFFSCREEN"
res = scene.render.resolution_x, scene.render.resolution_y
scene.render.resolution_x = scene.render.resolution_y = 4
bpy.ops.render.render()
scene.render.engine = engine
scene.render.resolution_x, scene.render.resolution_y = res
bpy.utils.unregister_class(OffscreenProbe)

mark('viewport_and_gpu_with_numba_jit')
# --- unregister leaves nothing behind ----------------------------------------------------------
bpy.ops.preferences.addon_disable(module=ADDON)
report["wm_props_left"] = [p for p in ("hda_fit",) if hasattr(bpy.types.WindowManager, p)]
report["handlers_left"] = {n: len(getattr(bpy.app.handlers, n)) - c for n, c in handlers_before.items()
                           if len(getattr(bpy.app.handlers, n)) != c}
report["ops_left"] = sorted(dir(bpy.ops.hda))
import threading
report["vp_threads_left"] = sorted(t.name for t in threading.enumerate() if t.name.startswith("hda-viewport"))
mark("unregister")
with open(args["out"], "w") as f:
    json.dump(report, f)
'''


def _motion_inputs(folder: Path) -> dict:
    from hda_backend import rig
    from hda_backend.body import load_body

    rng = np.random.default_rng(3)
    frames = 31
    pose = rng.normal(0, 0.25, (frames, 55, 3))
    transl = np.cumsum(rng.normal(0, 0.02, (frames, 3)), 0)
    np.savez(folder / "clip60.npz", poses=pose.reshape(frames, -1), trans=transl, mocap_frame_rate=np.array(60.0))
    # AMASS: SMPL-H layout, world +Z up (the root turns the body's +Y up onto +Z).
    up = rig.axis_angle_to_matrix(np.array([np.pi / 2, 0.0, 0.0]))
    amass = rng.normal(0, 0.2, (4, 156))
    amass[:, :3] = rig.quaternion_to_axis_angle(rig.matrix_to_quaternion(up @ rig.axis_angle_to_matrix(amass[:, :3])))
    np.savez(folder / "amass.npz", poses=amass, trans=rng.normal(0, 0.1, (4, 3)), mocap_framerate=np.array(30.0))
    bvh_pose, bvh_transl = rng.normal(0, 0.3, (5, 55, 3)), rng.normal(0, 0.1, (5, 3))
    write_bvh(folder / "clip.bvh", load_body().rest_joints().double().numpy(), bvh_pose, bvh_transl, 30.0)
    np.savez(folder / "bvh_ref.npz", pose=bvh_pose, transl=bvh_transl)
    (folder / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    bad = pose.copy()
    bad[2, 5, 1] = np.nan
    np.savez(folder / "nan.npz", poses=bad.reshape(frames, -1))
    (folder / "other.bvh").write_text("HIERARCHY\nROOT Hips\n{\n  OFFSET 0 0 0\n  CHANNELS 6 Xposition Yposition "
                                      "Zposition Zrotation Xrotation Yrotation\n  End Site\n  {\n    OFFSET 0 1 0\n  }\n}\n"
                                      "MOTION\nFrames: 1\nFrame Time: 0.033333\n0 0 0 0 0 0\n")
    (folder / "corrupt.hda.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return {"npz": folder / "clip60.npz", "amass": folder / "amass.npz", "bvh": folder / "clip.bvh",
            "bvh_ref": folder / "bvh_ref.npz", "corrupt_npz": folder / "corrupt.npz",
            "missing": folder / "nowhere.npz", "nan_npz": folder / "nan.npz", "bad_bvh": folder / "other.bvh",
            "corrupt_avatar": folder / "corrupt.hda.safetensors"}


def _run_driver(tmp_path: Path, built_zip: Path, subject: Path | None, model: Path | None,
                python: Path = BPY50_PYTHON, env_site: str | None = None) -> dict:
    """Run the driver in a fresh Blender; without subject and model it skips identity and fit."""
    inputs = {k: str(v) for k, v in _motion_inputs(tmp_path).items()}
    args = {"addon": ADDON, "zip": str(built_zip), "tmp": str(tmp_path), "out": str(tmp_path / "report.json"),
            "subject": str(subject), "model": str(model), "env_site": env_site, "full": model is not None, **inputs}
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = _hermetic_env(BLENDER_USER_RESOURCES=str(tmp_path / "blender_user"), HOME=str(tmp_path / "home"))
    env.pop("HDA_SMPLX_PATH", None)
    env.pop("HDA_DIFFUSION_MODEL", None)
    proc = subprocess.run([str(python), str(driver), json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((tmp_path / "report.json").read_text())


def _gaussians(seed: int, pose, transl):
    import torch

    from hda_backend.avatar.model import Avatar
    from hda_backend.body import load_body
    from hda_backend.config import load_config

    config = load_config("tiny")
    avatar = Avatar.from_init(load_body(), config.uv.res, config.unet, config.gaussians, seed=seed)
    with torch.no_grad():
        return avatar(torch.tensor(pose, dtype=torch.float32).reshape(1, -1),
                      torch.tensor(transl, dtype=torch.float32).reshape(1, 3)).index(0)


def _check_motion_export_viewport(r: dict, tmp_path: Path) -> None:
    """What every Blender version must do: motion import, export, viewport, GPU draw, clean unregister."""
    import math

    from hda_backend import rig
    from tests.test_export_ply import read_ply

    assert {"import_motion", "export_ply", "fit_subject", "cancel_fit", "sample_identity", "select_avatar"} <= set(r["ops"])
    assert r["panels"] == ["HDA_PT_main"]

    # Viewport handler: not added in background mode; added and removed when allowed.
    assert r["vp_background_handle"] is None and r["vp_removed"] is True

    # Motion: 31 frames at 60 fps onto a 30 fps scene -> 16 keys (0.5 s), 55x4 rotations + 3 locations.
    assert r["add"] == [["FINISHED"], None] and r["npz"] == [["FINISHED"], None]
    assert r["fcurves"] == 55 * 4 + 3 and r["keys"] == [16] and r["interp"] == ["LINEAR"]
    assert r["range"] == [1, 16, 30]
    assert max(r["key_err"]) < 1e-5                      # keys = rig.bone_rotations_from_pose at motion frame 2k
    assert max(e[0] for e in r["pose_err"]) < 1e-4      # the evaluated armature reads back the motion's pose
    assert max(e[1] for e in r["pose_err"]) < 1e-5
    assert r["npz_fps"][0] == ["FINISHED"] and r["keys_fps"] == [31] and r["range_fps"] == [1, 31, 60, 1.0]
    # Playback look-ahead: the keys predict Blender's evaluated pose (float32 vs float64 arithmetic).
    assert r["predict_err"] < AHEAD_MATCH_RAD / 10 and r["ahead_err"][0] < AHEAD_MATCH_RAD / 10 and r["ahead_err"][1], r
    assert r["frame_ahead"] == [6, 2, r["range"][1] - 1] and r["direction"] == [1, -1, 1, 1]
    assert r["ahead_constrained"] == [True, True, False] and r["look_ahead_stopped"], r
    assert r["ahead_flag"] == [True, False]   # the sidebar's look-ahead line: on while playing, gone once stopped
    # The constrained rig once its loop has played: the pose kept for the frame ahead (Blender's, in float32).
    assert r["loop_ahead"][:3] == [None, None, None] and r["loop_ahead"][3] < 1e-6, r["loop_ahead"]
    assert r["loop_ahead_flag"] is True
    assert r["predict_calls"] == [0, 1], r["predict_calls"]  # once the keys missed: not again until played anew
    assert r["loop_edited"] == [True, False, True] and r["played_bound"] == [3], (r["loop_edited"], r["played_bound"])
    assert max(r["look_ahead_err"]) < AHEAD_MATCH_RAD / 10, r["look_ahead_err"]
    assert r["amass"][0] == ["FINISHED"]
    assert r["amass_up_in_armature"][2] > 0.9 and r["amass_root_err"] < 1e-5  # stands up, as in AMASS's world
    assert r["bvh"][0] == ["FINISHED"] and r["bvh_objects_left"] == 0 and r["bvh_active"]
    assert max(e[0] for e in r["bvh_err"]) < 1e-4 and max(e[1] for e in r["bvh_err"]) < 1e-5
    assert r["corrupt_npz"][0] is None and "not a readable .npz file" in r["corrupt_npz"][1]
    assert r["missing"][0] is None and "motion file not found" in r["missing"][1]
    assert r["nan_npz"][0] is None and "NaN or inf" in r["nan_npz"][1]
    assert r["bad_bvh"][0] is None and "expected SMPL-X joint names" in r["bad_bvh"][1]

    # Export: scene frame 4 is motion frame 6; World coordinates = the armature's transform after Y->Z up.
    data = np.load(tmp_path / "clip60.npz")
    pose60, transl60 = data["poses"].reshape(-1, 55, 3), data["trans"]
    assert r["export"] == [["FINISHED"], None] and r["frame_after_export"] == 4
    rows = read_ply(tmp_path / "one.ply")
    g = _gaussians(0, pose60[6], transl60[6])
    c, s = math.cos(0.5), math.sin(0.5)
    world = np.eye(4)
    world[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ rig.AXIS_YUP_TO_ZUP
    world[:3, 3] = [0.4, -0.2, 0.9]
    assert np.allclose(np.load(tmp_path / "world.npy"), world, atol=1e-6)
    xyz = np.stack([rows["x"], rows["y"], rows["z"]], 1)
    assert np.abs(xyz - (g.means.double().numpy() @ world[:3, :3].T + world[:3, 3])).max() < 1e-4
    assert np.abs(np.stack([rows[f"f_dc_{i}"] for i in range(3)], 1) - g.sh[:, 0].numpy()).max() < 1e-5
    assert np.abs(1 / (1 + np.exp(-rows["opacity"])) - g.opacities.numpy()).max() < 1e-5
    assert r["export_range"][0] == ["FINISHED"]
    for frame, motion_frame in ((2, 2), (3, 4)):
        rows = read_ply(tmp_path / f"seq_{frame:04d}.ply")
        g = _gaussians(0, pose60[motion_frame], transl60[motion_frame])
        assert np.abs(np.stack([rows["x"], rows["y"], rows["z"]], 1) - g.means.numpy()).max() < 1e-4
    assert r["export_shear"][0] is None and "expected a uniform scale" in r["export_shear"][1]
    assert r["export_corrupt"][0] is None and "not a readable safetensors file" in r["export_corrupt"][1]

    # Viewport camera: perspective = rig.camera_from_blender; orthographic stand-in within 0.05 px.
    assert r["vp_persp"][0] < 1e-6 and r["vp_persp"][1] < 1e-6 and r["vp_persp"][2] == 0.0  # (float32 inverse)
    assert r["ortho_w"] == 1.0 and r["vp_ortho"][0] < 0.05 and r["vp_ortho"][1] < 1e-5

    # Offscreen draw with a GPU context: the quad shows the backend layer where it is in front of the
    # cleared depth, the background where the depth buffer is nearer; depth is written.
    assert len(r["gpu"]) == 2, r["gpu"]
    rgba = np.load(tmp_path / "layer_rgba.npy")[::-1]   # framebuffer rows run bottom to top
    depth = np.load(tmp_path / "layer_depth.npy")[::-1]
    proj = np.load(tmp_path / "proj.npy")
    ndc = 0.5 * (proj[2, 2] * -depth + proj[2, 3]) / (proj[3, 2] * -depth + proj[3, 3]) + 0.5
    drawn = (rgba[..., 3] >= 1e-4) & (ndc <= r["clear_depth"] + 1e-7)
    hidden = (rgba[..., 3] >= 1e-4) & ~drawn
    assert drawn.sum() > 20 and hidden.sum() > 20
    clear = np.array([0.2, 0.3, 0.4, 1.0])
    want = np.where(drawn[..., None], rgba + (1 - rgba[..., 3:]) * clear, clear)
    color, zbuf = np.load(tmp_path / "gpu_color.npy"), np.load(tmp_path / "gpu_depth.npy")
    assert np.abs(color - want).max() < 1e-4
    # Only the box the avatar covers is uploaded and drawn (a quad over that box); an empty layer: nothing.
    rows, cols = np.nonzero(rgba[..., 3] > 0)
    assert r["vp_rect"] == [cols.min() / 64, rows.min() / 48, (cols.max() + 1) / 64, (rows.max() + 1) / 48]
    assert r["vp_rect"] != [0.0, 0.0, 1.0, 1.0] and r["vp_empty"]
    assert np.abs(zbuf[drawn] - ndc[drawn]).max() < 1e-5 and np.abs(zbuf[~drawn] - r["clear_depth"]).max() < 1e-6
    # The draw handler through its worker: the first draw only asks (the view shows nothing yet), the
    # worker's two threads render off the main thread, and the next draw shows the same pixels as the
    # layer drawn directly; unregister stops the threads.
    assert r["vp_worker_threads"] == ["hda-viewport-0", "hda-viewport-1"] and r["vp_worker_idle"]
    assert r["vp_worker_first"] < 1e-6 and r["vp_worker_errors"] == {}, (r["vp_worker_first"], r["vp_worker_errors"])
    assert r["vp_worker_vs_direct"] < 1e-6 and r["vp_threads_left"] == [], (r["vp_worker_vs_direct"], r["vp_threads_left"])
    # The first draw's pose had just changed (moving): the level of detail, unless the preference is off.
    assert r["vp_lod_asked"] == [True, False], r["vp_lod_asked"]

    # Unregister: no handlers, window-manager properties or operators left.
    assert r["handlers_left"] == {} and r["wm_props_left"] == [] and r["ops_left"] == []


def test_periphery_in_blender_5_0(tmp_path, built_zip, subject, diffusion_model):
    from hda_backend.diffusion.sample import interpolate_noise, load_diffusion, sample_avatars
    from hda_backend.diffusion.weights import state_dict_to_vector
    from safetensors.torch import load_file

    r = _run_driver(tmp_path, built_zip, subject, diffusion_model)
    print("driver seconds:", r["seconds"])
    assert r["version"][:2] == [5, 0]
    _check_motion_export_viewport(r, tmp_path)

    # Identity: same seed -> the same avatar the sampler writes; the slider -> noise slerp.
    # Out of the box, with no model named anywhere, the extension samples from the model it bundles.
    assert r["identity_default"] == [["FINISHED"], None]
    seed = r["identity_default_seed"]
    # Content-addressed names (blender_addon/identity.py): seeds, mix, the model file's sha256, steps.
    default_digest = hashlib.sha256((REPO / "assets" / "default" / "diffusion.safetensors").read_bytes()).hexdigest()
    assert Path(r["identity_default_file"]).name == f"identity_{seed}-{default_digest[:12]}.hda.safetensors"
    bundled = sample_avatars(load_diffusion(REPO / "assets" / "default" / "diffusion.safetensors"), seed, 1, None,
                             tmp_path / "bundled")[0]
    got, want = load_file(r["identity_default_file"]), load_file(str(bundled))
    assert got.keys() == want.keys() and all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in got)
    digest = hashlib.sha256(diffusion_model.read_bytes()).hexdigest()[:12]
    assert r["identity"] == [["FINISHED"], None]
    assert Path(r["identity_file"]).name == f"identity_5-{digest}-s3.hda.safetensors"
    assert r["identity_loaded"] == 32
    model = load_diffusion(diffusion_model)
    ref = sample_avatars(model, 5, 1, 3, tmp_path / "ref")[0]
    got, want = load_file(r["identity_file"]), load_file(str(ref))
    assert got.keys() == want.keys() and all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in got)
    assert Path(r["identity_mix_file"]).name == f"identity_5_7_0.50-{digest}-s3.hda.safetensors"
    vec = state_dict_to_vector(load_file(r["identity_mix_file"]), model.spec)
    assert np.allclose(vec.numpy(), interpolate_noise(model, 5, 7, 0.5, 3).numpy(), atol=1e-6)
    assert r["identity_random"][0] == ["FINISHED"] and r["identity_random_seed"] != 5
    assert r["identity_corrupt"][0] is None and "diffusion model" in r["identity_corrupt"][1] and r["identity_kept"]

    # Fit: background mode waits; the modal path ticks through step() and cancels.
    assert r["fit_nosubject"][0] is None and "no subject.json" in r["fit_nosubject"][1]
    assert r["fit"] == [["FINISHED"], None], r["fit_line"]
    assert r["fit_path"].endswith("avatars/teacher.hda.safetensors")
    assert Path(r["fit_path"]).is_relative_to(tmp_path / "blender_user")  # unsaved .blend: the user folder
    assert r["fit_line"].startswith("fitted teacher onto") and r["fit_loaded"] == 32
    assert r["fit_poll_running"] is False
    state, line, unchanged = r["fit_cancel"]
    assert state == "CANCELLED" and line.startswith("fit cancelled at step") and unchanged
    print(f"fit modal tick: max {r['fit_tick_ms'][0]:.1f} ms, median {r['fit_tick_ms'][1]:.2f} ms over "
          f"{r['fit_tick_ms'][2]} ticks")


@pytest.mark.skipif(not BPY42_PYTHON.exists(), reason="no .venv-bpy42 (bpy==4.2.* for Blender 4.2 LTS)")
def test_periphery_in_blender_4_2(tmp_path, built_zip):
    """Blender 4.2 LTS (legacy actions, its own BVH importer and GPU module), with the backend taken from
    this project's environment through the preferences' Existing Environment."""
    import site

    r = _run_driver(tmp_path, built_zip, None, None, python=BPY42_PYTHON, env_site=site.getsitepackages()[0])
    assert r["version"][:2] == [4, 2]
    _check_motion_export_viewport(r, tmp_path)
