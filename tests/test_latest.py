"""hda_backend.latest (the viewport's worker: latest request wins) and hda_backend.preview (its job).

The worker's logic is checked without timing anything: fake stages block on explicit events, and the
test waits for states (a request taken, a result landed), never for durations. The preview stages on
the worker give the same images as the serial path (render_preview) and as the avatar's float32 twin.
"""

from __future__ import annotations

import ast
import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hda_backend.errors import HDAError
from hda_backend.latest import LatestWins
from hda_backend.preview import (AHEAD_MATCH_RAD, EXTRAPOLATE_RANGE, REFRESH_FRAMES, PoseStage, PreviewRequest,
                                 extrapolate, raster_stage, render_preview, same_pose)

REPO = Path(__file__).resolve().parent.parent
WAIT = 10.0  # seconds: only a bound for a broken worker; nothing here depends on it


def test_the_latest_request_wins_and_stale_ones_are_dropped():
    gate, entered, gate3, calls = threading.Event(), threading.Event(), threading.Event(), []

    def slow(value):
        calls.append(value)
        if value == 1:
            entered.set()
            assert gate.wait(WAIT)
        if value == 3:
            assert gate3.wait(WAIT)
        return value * 10

    worker = LatestWins([slow])
    try:
        assert worker.latest() is None
        assert worker.submit("a", 1) == 1
        assert entered.wait(WAIT)            # the stage is busy with request 1
        worker.submit("b", 2)
        worker.submit("c", 3)                # replaces 2, which never started
        assert worker.dropped == 1 and not worker.idle()
        gate.set()
        assert worker.wait(lambda w: w.finished_seq() == 1, WAIT)   # request 1 lands first ...
        assert worker.latest().value == 10 and not worker.idle()
        gate3.set()                                                   # ... then 3, while 2 never runs
        assert worker.wait(lambda w: w.finished_seq() == 3 and w.idle(), WAIT)
        done = worker.latest()
        assert (done.seq, done.key, done.value, done.error) == (3, "c", 30, None)
        assert calls == [1, 3]
    finally:
        worker.close()


def test_two_stages_overlap_and_finish_in_order():
    """While stage 2 works on request 1, stage 1 evaluates request 2 (the pipeline overlaps)."""
    second_busy, release, overlapped = threading.Event(), threading.Event(), []

    def first(value):
        if value == 2:
            overlapped.append(second_busy.is_set() and not release.is_set())
        return value + 100

    def second(value):
        if value == 101:
            second_busy.set()
            assert release.wait(WAIT)
        return -value

    worker = LatestWins([first, second])
    try:
        worker.submit("one", 1)
        assert second_busy.wait(WAIT)
        worker.submit("two", 2)
        assert worker.wait(lambda w: w.taken(2) and w._slots[1] is not None, WAIT)  # 2 passed stage 1
        assert overlapped == [True] and worker.finished_seq() == 0
        release.set()
        assert worker.wait(lambda w: w.finished_seq() == 2 and w.idle(), WAIT)
        assert worker.latest().value == -102 and worker.dropped == 0
    finally:
        worker.close()


def test_a_failing_stage_hands_back_its_error_and_the_worker_goes_on():
    def stage(value):
        if value < 0:
            raise HDAError("bad pose")
        return value

    worker = LatestWins([stage, lambda v: v * 2])
    try:
        worker.submit("bad", -1)
        assert worker.wait(lambda w: w.finished_seq() == 1, WAIT)
        done = worker.latest()
        assert done.value is None and isinstance(done.error, HDAError) and str(done.error) == "bad pose"
        worker.submit("good", 4)
        assert worker.wait(lambda w: w.finished_seq() == 2, WAIT)
        assert worker.latest().value == 8 and worker.latest().error is None
    finally:
        worker.close()


def test_a_stage_follow_up_runs_once_its_request_left_the_last_stage():
    """follow_up() runs on the stage's thread once the request it handed on has left the last stage (so
    it never takes the cores from the later stages), the worker is not idle until it returns, and an
    exception it raises is dropped while the worker goes on."""
    in_last, release_last, in_follow, release_follow = (threading.Event() for _ in range(4))
    order = []

    class Stage:
        skip = False

        def __call__(self, value):
            order.append(("stage", value))
            return value

        def follow_up(self, wait):
            if self.skip:
                return                                  # nothing to prepare: no wait for the last stage
            wait()
            order.append("follow_up")
            in_follow.set()
            release_follow.wait(WAIT)
            raise RuntimeError("only an optimisation")

    def last(value):
        in_last.set()
        release_last.wait(WAIT)
        return value * 2

    stage = Stage()
    worker = LatestWins([stage, last])
    try:
        worker.submit("a", 1)
        assert in_last.wait(WAIT)
        assert not in_follow.wait(0.2)                  # the last stage is still working: no follow_up yet
        release_last.set()
        assert in_follow.wait(WAIT) and worker.finished_seq() == 1
        assert worker.latest().value == 2 and not worker.idle()       # follow_up still running
        release_follow.set()
        assert worker.wait(lambda w: w.idle(), WAIT)
        worker.submit("b", 3)
        assert worker.wait(lambda w: w.finished_seq() == 2 and w.idle(), WAIT)
        assert worker.latest().value == 6 and worker.latest().error is None
        assert order == [("stage", 1), "follow_up", ("stage", 3), "follow_up"]
        # A follow-up with nothing to do returns at once: the stage takes the next request while the
        # last stage still works on this one (the pipelining of two stages).
        stage.skip, in_last = True, threading.Event()
        release_last.clear()
        worker.submit("c", 5)
        assert in_last.wait(WAIT)
        worker.submit("d", 7)
        assert worker.wait(lambda w: ("stage", 7) in order, WAIT)     # taken while "c" is still in the last stage
        release_last.set()
        assert worker.wait(lambda w: w.finished_seq() == 4 and w.idle(), WAIT) and worker.latest().value == 14
    finally:
        worker.close()


def test_close_stops_every_thread():
    worker = LatestWins([lambda v: v, lambda v: v], name="hda-test-close")
    worker.close()
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("hda-test-close"))
    with pytest.raises(RuntimeError):
        worker.submit("late", 1)


# ------------------------------------------------------------------------------------ the job itself
@pytest.fixture(scope="module")
def avatar():
    from hda_backend.avatar.io import SUFFIX, load_avatar
    from hda_backend.body import load_body

    path = sorted((REPO / "assets" / "default" / "references").glob("*" + SUFFIX))[0]
    return load_avatar(path, load_body()).eval()


def _requests(fast, count: int):
    from hda_backend.motion import procedural
    from hda_backend.render.camera import intrinsics, look_at

    K = intrinsics(80, 60, 35.0).numpy()
    view = look_at(torch.tensor([0.4, 0.3, 3.2]), torch.tensor([0.0, -0.1, 0.0]), torch.tensor([0.0, 1.0, 0.0])).numpy()
    poses = procedural("walk", count).poses.reshape(count, -1).numpy()
    return [PreviewRequest(fast, poses[i], np.zeros(3, np.float32), poses[i].tobytes(), view, K, 80, 60, "flat", 1)
            for i in range(count)]


def test_preview_on_the_worker_equals_the_serial_path_and_the_float32_twin(avatar):
    from hda_backend.avatar.realtime import RealtimeAvatar
    from hda_backend.layer import to_layer
    from hda_backend.render.frames import render_gaussians

    fast = RealtimeAvatar(avatar, "float32")
    requests = _requests(fast, 3)
    worker = LatestWins([PoseStage(), raster_stage])
    try:
        for request in requests:
            seq = worker.submit(request.pose_key, request)
            assert worker.wait(lambda w: w.finished_seq() == seq, 60.0)
            rgba, depth = worker.latest().value
            serial = render_preview(request)
            np.testing.assert_array_equal(rgba, serial[0])
            np.testing.assert_array_equal(depth, serial[1])
            with torch.inference_mode():  # the float32 reference: Avatar itself, rasterized, layered
                g = avatar(torch.as_tensor(request.pose).reshape(1, 55, 3)).index(0)
                out, alpha = render_gaussians(g, torch.as_tensor(request.viewmat),
                                              torch.as_tensor(request.K), 80, 60, render_mode="RGB+ED", sh_degree=3)
            ref = to_layer(out[..., :3].numpy(), alpha[..., 0].numpy(), out[..., 3].numpy())
            np.testing.assert_allclose(rgba, ref[0], atol=2e-4)
    finally:
        worker.close()


def test_an_unchanged_pose_is_not_evaluated_again(avatar):
    from hda_backend.avatar.realtime import RealtimeAvatar

    class Counting(RealtimeAvatar):
        calls = 0

        def raw_output(self, pose):
            Counting.calls += 1
            return super().raw_output(pose)

    fast = Counting(avatar, "float32")
    first, second = _requests(fast, 2)
    stage = PoseStage()
    _, g1 = stage(first)
    _, again = stage(first)
    stage(second)
    assert Counting.calls == 2 and again is g1


class _FakeFast:
    """A stand-in for RealtimeAvatar whose UNet output is linear in the pose (its first value), so that
    the extrapolated output of every re-skinned frame is exactly that frame's own; it records which
    poses the UNet ran on."""

    def __init__(self):
        self.log = []

    def raw_output(self, pose):
        self.log.append(("unet", int(pose[0])))
        return torch.full((1, 1, 1), float(pose[0])), "posed"

    def skin(self, raw, pose, transl=None, posed=None):
        return (float(raw), int(pose[0]))


def _fake(fast, frame: int, lod: bool, ahead: int | None = None) -> PreviewRequest:
    pose = np.full(165, frame, np.float32)
    return PreviewRequest(fast, pose, np.zeros(3, np.float32), pose.tobytes(), np.eye(4), np.eye(3), 8, 8,
                          "flat", 1, lod, None if ahead is None else np.full(165, ahead, np.float32))


def _unet_frames(fast):
    return [frame for what, frame in fast.log if what == "unet"]


def test_the_level_of_detail_reskins_and_refreshes_the_unet_every_nth_frame():
    """Playback (lod requests): the UNet runs on every REFRESH_FRAMES-th (2nd) frame from 0; frames
    between re-skin the last output, carried along the pose change between the UNet's last two poses
    (exact for this linear fake), as is before there are two (frame 1). A request without lod (the
    playhead stopped) always gets its own pose's UNet output, even when the lod one of that pose was
    just re-skinned; an lod request of a pose whose own output is at hand is that output's Gaussians."""
    assert REFRESH_FRAMES == 2
    fast = _FakeFast()
    stage = PoseStage()
    got = [stage(_fake(fast, f, True))[1] for f in range(9)]
    assert got == [(0.0, 0), (0.0, 1)] + [(float(f), f) for f in range(2, 9)]
    assert _unet_frames(fast) == [0, 2, 4, 6, 8] and stage.unet_runs == 5
    assert stage(_fake(fast, 7, False))[1] == (7.0, 7) and stage.unet_runs == 6     # stopped: full quality
    assert stage(_fake(fast, 7, False))[1] == (7.0, 7) and stage.unet_runs == 6     # cached now
    assert stage(_fake(fast, 7, True))[1] == (7.0, 7) and stage.unet_runs == 6      # exact is fine for lod
    assert stage(_fake(fast, 8, True))[1] == (8.0, 8)     # scrubbing on: back towards the older output (8)
    assert stage(_fake(fast, 9, True))[1] == (9.0, 9) and _unet_frames(fast)[-1] == 9   # refresh
    other = _FakeFast()                                   # another avatar: its own UNet first, then as is
    assert [stage(_fake(other, f, True))[1] for f in (11, 12, 13, 14)] == [(11.0, 11), (11.0, 12), (13.0, 13),
                                                                          (14.0, 14)]
    assert _unet_frames(other) == [11, 13]
    assert [stage(_fake(fast, f, False))[1] for f in (12, 13)] == [(12.0, 12), (13.0, 13)]
    stage = PoseStage(refresh_frames=4)                   # another interval: the UNet on 0 and 4
    assert [stage(_fake(fast, f, True))[1][1] for f in range(6)] == list(range(6))
    assert _unet_frames(fast)[-2:] == [0, 4]
    assert PoseStage().refresh_frames == REFRESH_FRAMES


def test_with_look_ahead_the_unet_runs_on_the_next_refresh_pose_between_frames():
    """Playback with look-ahead (lod requests that name the pose REFRESH_FRAMES frames on): the UNet
    runs on the critical path only for the first frame; after each frame whose output is its own,
    follow_up runs it on the predicted pose, which the frame reaching that pose skins (its output as
    is), and the frames in between interpolate (exact for this linear fake, including frame 1, which
    without look-ahead re-skins as is). A prediction the playhead does not reach is never used for
    the frame it named: a jump re-skins at most REFRESH_FRAMES - 1 frames before the UNet runs on the
    critical path again; a request without lod always runs it and prepares nothing."""
    fast = _FakeFast()
    stage = PoseStage()
    got = []
    for f in range(9):
        got.append(stage(_fake(fast, f, True, ahead=f + REFRESH_FRAMES))[1])
        stage.follow_up()
    assert got == [(float(f), f) for f in range(9)]
    assert _unet_frames(fast) == [0, 2, 4, 6, 8, 10] and (stage.unet_runs, stage.ahead_runs) == (1, 5)
    near = np.full(165, 10, np.float32)
    near[5] += 0.5 * AHEAD_MATCH_RAD                       # within the match: the output made ahead
    assert stage(dataclasses.replace(_fake(fast, 10, True), pose=near, pose_key=near.tobytes()))[1] == (10.0, 10)
    assert stage.unet_runs == 1
    stage.follow_up()                                      # no ahead in that request: nothing prepared
    assert stage.ahead_runs == 5
    stage(_fake(fast, 11, True, ahead=13))                 # re-skinned (carried), prepares nothing
    stage.follow_up()
    assert stage(_fake(fast, 12, True, ahead=14))[1] == (12.0, 12) and stage.unet_runs == 2   # refresh
    stage.follow_up()                                      # the UNet on 14
    assert stage(_fake(fast, 20, True, ahead=22))[1] == (14.0, 20)   # a jump: clamped to the output made ahead
    stage.follow_up()
    assert stage(_fake(fast, 21, True))[1] == (21.0, 21) and stage.unet_runs == 3   # then the UNet again
    assert not same_pose(np.full(165, 14.0), np.full(165, 14.0 + 2 * AHEAD_MATCH_RAD))
    assert stage(_fake(fast, 22, False, ahead=24))[1] == (22.0, 22) and stage.unet_runs == 4
    stage.follow_up()
    assert stage.ahead_runs == 6 and _unet_frames(fast)[-1] == 22   # still: nothing prepared
    stage.follow_up()                                       # twice in a row: nothing to do
    assert stage.ahead_runs == 6


def test_extrapolate_carries_the_output_along_the_last_pose_change():
    """extrapolate against hand-computed cases: the projection onto the last step over the local joints
    only (the global orientation, pose[:3], is ignored), clamped to EXTRAPOLATE_RANGE; the newer output
    itself for a zero step or a zero projection."""
    a, b = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0, 6.0]]])
    pa, pb = np.zeros(165, np.float32), np.zeros(165, np.float32)
    pb[3], pb[4] = 2.0, 0.0
    pose = pb.copy()
    pose[3], pose[5], pose[0] = 3.0, 7.0, 9.0        # half a step on, plus a move off the line and globally
    torch.testing.assert_close(extrapolate((a, pa), (b, pb), pose), b + 0.5 * (b - a))
    pose[3] = 0.0                                      # back to the older pose: its output
    torch.testing.assert_close(extrapolate((a, pa), (b, pb), pose), a)
    pose[3] = 10.0                                     # 4 steps on: clamped to the range's end
    assert EXTRAPOLATE_RANGE[1] == 1.0
    torch.testing.assert_close(extrapolate((a, pa), (b, pb), pose), b + (b - a))
    pose[3] = -10.0
    torch.testing.assert_close(extrapolate((a, pa), (b, pb), pose), b - (b - a))
    pose[3] = 2.0                                      # only off the line
    assert extrapolate((a, pa), (b, pb), pose) is b
    assert extrapolate((a, pb), (b, pb), pose) is b    # no step


def test_when_playback_stops_the_shown_image_is_the_full_paths(avatar):
    """Through the worker: a played clip (lod requests) shows re-skinned frames that differ from the full
    path, and the request sent once the playhead stops (same pose, no lod) shows the full path's image."""
    from hda_backend.avatar.realtime import RealtimeAvatar

    fast = RealtimeAvatar(avatar, "float32")
    requests = _requests(fast, 6)
    worker = LatestWins([PoseStage(), raster_stage])
    try:
        shown = []
        for request in requests:
            seq = worker.submit(request.pose_key, dataclasses.replace(request, lod=True))
            assert worker.wait(lambda w: w.finished_seq() == seq, 60.0)
            shown.append(worker.latest().value)
        full = [render_preview(r) for r in requests]
        differs = [not np.array_equal(s[0], f[0]) for s, f in zip(shown, full)]
        # The UNet ran on every REFRESH_FRAMES-th frame from 0, the others re-skinned its output.
        assert differs == [i % REFRESH_FRAMES != 0 for i in range(6)] and any(differs)
        seq = worker.submit(requests[-1].pose_key, requests[-1])      # stopped on the last frame
        assert worker.wait(lambda w: w.finished_seq() == seq, 60.0)
        rgba, depth = worker.latest().value
        np.testing.assert_array_equal(rgba, full[-1][0])
        np.testing.assert_array_equal(depth, full[-1][1])
    finally:
        worker.close()


def test_no_blender_data_reaches_the_worker():
    """bpy stays on the main thread: the worker's modules never import it, and the viewport hands the
    worker only hda_backend.preview's stages."""
    for module in ("latest.py", "preview.py"):
        tree = ast.parse((REPO / "hda_backend" / module).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(x.split(".")[0] in {"bpy", "gpu", "mathutils"} for x in names | modules), module
    tree = ast.parse((REPO / "blender_addon" / "viewport.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "LatestWins"]
    assert calls, "the viewport no longer uses the worker"
    for call in calls:
        stages = call.args[0]
        assert isinstance(stages, (ast.List, ast.Tuple))
        for stage in stages.elts:
            target = stage.func if isinstance(stage, ast.Call) else stage
            assert isinstance(target, ast.Attribute) and getattr(target.value, "id", None) == "preview", \
                ast.unparse(stage)


_CONCURRENT_RASTER = r'''
import threading, torch
from hda_backend.render.rasterize import rasterize
gen = torch.Generator().manual_seed(0)
n = 400
means = torch.randn(n, 3, generator=gen) * 0.5 + torch.tensor([0.0, 0.0, 4.0])
quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1)
scales, opacities = torch.rand(n, 3, generator=gen) * 0.1 + 0.02, torch.rand(n, generator=gen)
colors, view = torch.rand(n, 3, generator=gen), torch.eye(4)[None]
K = torch.tensor([[[80.0, 0.0, 48.0], [0.0, 80.0, 40.0], [0.0, 0.0, 1.0]]])
one = lambda: rasterize(means, quats, scales, opacities, colors, view, K, 96, 80, backend="cpu")[0]
ref, differ = one(), []
def loop():
    for _ in range(30):
        differ.append(not torch.equal(one(), ref))
threads = [threading.Thread(target=loop) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
import numba
print(numba.threading_layer(), sum(differ), len(differ))
'''


def test_threads_rasterizing_at_once_take_turns_under_numbas_workqueue_layer():
    """The viewport's worker rasterizes while the main thread may render a layer. Under numba's workqueue
    threading layer (where neither TBB nor OpenMP is installed) two parallel launches at once abort the
    process; the rasterizer's launches take turns, and every image equals the one rendered alone."""
    import os
    import subprocess
    import sys

    pytest.importorskip("numba")
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", _CONCURRENT_RASTER], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["workqueue", "0", "90"], run.stdout
