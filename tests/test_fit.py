"""Stage 1 fitting on a tiny teacher-rendered subject: learning, exact resume, kills, fit-all, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hda_backend.avatar.io import SUFFIX, load_avatar, save_avatar
from hda_backend.avatar.gaussians import GaussianConfig
from hda_backend.avatar.model import Avatar
from hda_backend.avatar.unet import UNetConfig
from hda_backend.body import load_body
from hda_backend.cli import main
from hda_backend.config import load_config
from hda_backend.dataset import load_subject
from hda_backend.errors import HDAError
from hda_backend.fit.evaluate import evaluate, evaluation_views
from hda_backend.fit.losses import ssim
from hda_backend.fit.appearance import MapAvatar
from hda_backend.fit.trainer import FitPaths, crop_box, fit_map_only, fit_subject, render_view
from tests.teacher import teacher_avatar, write_teacher_subject


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory):
    return write_teacher_subject(tmp_path_factory.mktemp("data") / "teacher")


def _config(tmp_path, **fit):
    path = tmp_path / "fit.yaml"
    path.write_text("preset: tiny\nfit: " + json.dumps(fit) + "\n")
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ssim_by_hand(a, b):
    """Mean SSIM of two single-channel 2-D images by explicit 11 x 11 windows (zero padding)."""
    x = torch.arange(11) - 5.0
    w = torch.outer(torch.exp(-x ** 2 / 4.5), torch.exp(-x ** 2 / 4.5))
    w /= w.sum()
    pa, pb = torch.nn.functional.pad(a, (5,) * 4), torch.nn.functional.pad(b, (5,) * 4)
    total = 0.0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            wa, wb = pa[i:i + 11, j:j + 11], pb[i:i + 11, j:j + 11]
            ma, mb = (w * wa).sum(), (w * wb).sum()
            va, vb = (w * wa * wa).sum() - ma ** 2, (w * wb * wb).sum() - mb ** 2
            cov = (w * wa * wb).sum() - ma * mb
            total += ((2 * ma * mb + 1e-4) * (2 * cov + 9e-4)) / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4))
    return float(total) / a.numel()


def test_ssim_matches_a_direct_windowed_computation():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 1, 15, 15, generator=gen), torch.rand(1, 1, 15, 15, generator=gen)
    assert float(ssim(a, a)) == pytest.approx(1.0, abs=1e-6)
    assert float(ssim(a, b)) == pytest.approx(_ssim_by_hand(a[0, 0], b[0, 0]), abs=1e-5)
    # Several images and channels (the fit's 3 cameras x RGB): the mean over every image's own SSIM,
    # so no channel's window reaches into another's.
    a, b = torch.rand(2, 3, 13, 9, generator=gen), torch.rand(2, 3, 13, 9, generator=gen)
    b[1, 2] = a[1, 2]
    want = sum(_ssim_by_hand(a[i, c], b[i, c]) for i in range(2) for c in range(3)) / 6
    assert float(ssim(a, b)) == pytest.approx(want, abs=1e-5)


def test_crop_box():
    mask = torch.zeros(40, 50)
    mask[10:20, 30:34] = 1
    assert crop_box(mask, 0.1) == (24, 7, 40, 23)  # grown to at least 16 px
    assert crop_box(torch.zeros(8, 8), 0.1) == (0, 0, 8, 8)


def test_teacher_scores_itself_perfectly(subject_dir):
    """The evaluation renders with the stored cameras and poses: an avatar matches its own renders."""
    result = evaluate(load_subject(subject_dir), teacher_avatar())
    assert result["novel view"]["psnr"] > 45 and result["novel pose"]["psnr"] > 45
    assert result["novel view"]["views"] == 4 and result["novel pose"]["views"] == 8


def test_full_image_psnr_counts_the_background(subject_dir):
    """psnr_full is over the whole frame, psnr inside the mask's bounding box dilated by 8 px; the
    background lifts the former."""
    subject = load_subject(subject_dir)
    fresh = Avatar.from_init(load_body(), 32, UNetConfig(width=16, levels=2), GaussianConfig(), seed=0)
    result = evaluate(subject, fresh, max_frames=1)["novel view"]
    cam, frame = subject.test_cameras[0], subject.train_frames[0]
    mask = subject.mask(cam, frame).numpy()
    ys, xs = np.nonzero(mask > 0.5)  # the box, found independently
    y0, y1, x0, x1 = max(ys.min() - 8, 0), min(ys.max() + 9, mask.shape[0]), max(xs.min() - 8, 0), min(xs.max() + 9, mask.shape[1])
    rgb, _ = render_view(fresh, subject, cam, frame)
    gt = subject.image(cam, frame)
    err = (rgb - gt).detach().numpy().astype(np.float64) ** 2
    assert result["psnr_full"] == pytest.approx(-10 * np.log10(err.mean()), abs=1e-3)
    assert result["psnr"] == pytest.approx(-10 * np.log10(err[y0:y1, x0:x1].mean()), abs=1e-3)
    assert result["psnr_full"] > result["psnr"] + 3


def test_fit_learns_and_writes_its_outputs(subject_dir, tmp_path, capsys):
    out = tmp_path / "s.hda.safetensors"
    code = main(["fit", str(subject_dir), "--out", str(out), "--config", str(_config(tmp_path, steps=30, log_every=5))])
    assert code == 0, capsys.readouterr().err
    rows = _rows(tmp_path / "s.metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert rows[-1]["psnr"] > rows[0]["psnr"] + 3
    for name in ("s.curve.png", "s.views.png", "s.ckpt.safetensors"):
        assert (tmp_path / name).stat().st_size > 0
    subject = load_subject(subject_dir)
    fitted = load_avatar(out, load_body())
    fresh = Avatar.from_init(load_body(), 32, UNetConfig(16, 2), load_config("tiny").gaussians, seed=0)
    assert evaluate(subject, fitted)["novel pose"]["psnr"] > evaluate(subject, fresh)["novel pose"]["psnr"] + 3
    assert main(["render", "--avatar", str(out), "--preset", "tiny", "--frames", "2", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "frame_0001.png").is_file()


def test_interrupted_and_resumed_fit_equals_an_uninterrupted_one(subject_dir, tmp_path):
    config = load_config(_config(tmp_path, steps=12, checkpoint_every=4, log_every=2))
    full = fit_subject(subject_dir, tmp_path / "a.hda.safetensors", config, progress=False)
    part = fit_subject(subject_dir, tmp_path / "b.hda.safetensors", config, progress=False, stop_after=4)
    assert part.steps == 4 and not (tmp_path / "b.hda.safetensors").exists()
    with pytest.raises(HDAError, match="pass --resume"):
        fit_subject(subject_dir, tmp_path / "b.hda.safetensors", config, progress=False)
    resumed = fit_subject(subject_dir, tmp_path / "b.hda.safetensors", config, progress=False, resume=True)
    assert resumed.steps == 12
    a, b = full.avatar.unet.state_dict(), resumed.avatar.unet.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    ra, rb = _rows(tmp_path / "a.metrics.jsonl"), _rows(tmp_path / "b.metrics.jsonl")
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(2, 13, 2))
    assert [r["lr"] for r in rb] == [r["lr"] for r in ra]
    assert np.allclose([r["loss"] for r in rb], [r["loss"] for r in ra], rtol=1e-3)


def test_killing_a_real_fit_loses_at_most_one_interval(subject_dir, tmp_path):
    out = tmp_path / "k.hda.safetensors"
    ckpt = tmp_path / "k.ckpt.safetensors"
    cfg = _config(tmp_path, steps=400, checkpoint_every=3, log_every=1)
    cmd = [sys.executable, "-m", "hda_backend.cli", "fit", str(subject_dir), "--out", str(out), "--config", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and step < 9:
        time.sleep(0.2)
        if ckpt.exists():
            try:
                with safe_open(str(ckpt), framework="pt") as fh:
                    step = int(fh.metadata()["step"])
            except Exception:  # never expected: writes are atomic
                proc.kill()
                raise
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step >= 9, "the fit did not reach its third checkpoint in time"
    with safe_open(str(ckpt), framework="pt") as fh:  # the checkpoint left by the kill is whole
        saved = int(fh.metadata()["step"])
    logged = max(r["step"] for r in _rows(tmp_path / "k.metrics.jsonl"))
    assert saved % 3 == 0 and logged - saved < 3 + 2  # at most one interval (plus the step in flight) lost
    assert not list(tmp_path.glob("*.tmp"))
    cfg.write_text(cfg.read_text())
    config = load_config(cfg)
    result = fit_subject(subject_dir, out, config, resume=True, progress=False, stop_after=saved + 3)
    assert result.steps == saved + 3
    rows = _rows(tmp_path / "k.metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, saved + 4))  # no gap, no duplicate


def test_fit_all_two_ranks_fit_each_subject_once(subject_dir, tmp_path):
    data = tmp_path / "data"
    for name in ("s0", "s1", "s2", "s3"):
        shutil.copytree(subject_dir, data / name)
        meta = json.loads((data / name / "subject.json").read_text())
        (data / name / "subject.json").write_text(json.dumps({**meta, "name": name}))
    out = tmp_path / "fits"
    cfg = _config(tmp_path, steps=3, init_steps=2, log_every=1, checkpoint_every=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "hda_backend.cli", "fit-all", str(data), "--out", str(out), "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    logs = [json.loads(line) for k in (0, 1) for line in (out / f"fit_all.rank{k}.jsonl").read_text().splitlines()]
    fitted = sorted(r["subject"] for r in logs if r["status"] == "fitted")
    assert fitted == ["s0", "s1", "s2", "s3"]
    assert {r["rank"] for r in logs} == {0, 1}
    assert next(r for r in logs if r["subject"] == "s0")["rank"] == 0
    for name in ("s1", "s2", "s3"):  # all started from the first subject's weights
        assert _rows(out / f"{name}.metrics.jsonl")[-1]["step"] == 2
    # A re-run skips every finished subject.
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0
    again = [json.loads(line) for k in (0, 1) for line in (out / f"fit_all.rank{k}.jsonl").read_text().splitlines()]
    assert {r["status"] for r in again} == {"skipped"} and len(again) == 4


def _broken(subject_dir, tmp_path, damage):
    root = tmp_path / "broken"
    shutil.copytree(subject_dir, root)
    damage(root)
    return root


@pytest.mark.parametrize("damage, message", [
    (lambda r: os.remove(r / "masks" / "cam00" / "0001.png"), "0001.png: file is missing"),
    (lambda r: os.remove(r / "cameras.json"), "cameras.json"),
    (lambda r: os.remove(r / "smplx" / "0002.npz"), "0002.npz"),
    (lambda r: np.savez(r / "smplx" / "0000.npz", **{**dict(np.load(r / "smplx" / "0000.npz")),
                                                       "body_pose": np.full(63, np.nan)}), "0000.npz"),
    (lambda r: (r / "images" / "cam01" / "0000.png").write_bytes(
        (r / "images" / "cam01" / "0000.png").read_bytes()[:40]), "0000.png"),
])
def test_bad_subjects_fail_in_one_line(subject_dir, tmp_path, capsys, damage, message):
    root = _broken(subject_dir, tmp_path, damage)
    code = main(["fit", str(root), "--out", str(tmp_path / "x.hda.safetensors"), "--preset", "tiny", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hda: error: ") and err.count("\n") == 1
    assert message in err


def test_init_from_another_architecture_is_refused(subject_dir, tmp_path, capsys):
    config = load_config("tiny")
    wide = Avatar.from_init(load_body(), 32, UNetConfig(width=32, levels=2), config.gaussians)
    path = save_avatar(wide, tmp_path / "wide.hda.safetensors")
    code = main(["fit", str(subject_dir), "--out", str(tmp_path / "y.hda.safetensors"), "--preset", "tiny",
                 "--init-from", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "--init-from" in err and "wide.hda.safetensors" in err and "field 'unet'" in err


def test_schedules_warm_up_then_decay():
    """lr: linear warm-up then cosine to lr*lr_final at the last step; SH: one band more every n steps."""
    from hda_backend.fit.trainer import learning_rate, sh_degree
    config = load_config("tiny", {"fit": {"lr": 1e-3, "warmup_steps": 10, "lr_final": 0.1, "sh_degree_every": 5},
                                  "gaussians": {"sh_degree": 2}})
    fit = config.fit
    assert [learning_rate(fit, s, 110) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert learning_rate(fit, 10, 110) == pytest.approx(1e-3)
    assert learning_rate(fit, 60, 110) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(fit, 110, 110) == pytest.approx(1e-4)
    assert [sh_degree(fit, config, s) for s in (0, 4, 5, 10, 15, 100)] == [0, 0, 1, 2, 2, 2]
    constant = load_config("tiny", {"fit": {"warmup_steps": 0}}).fit
    assert {learning_rate(constant, s, 30) for s in range(30)} == {constant.lr}


def test_eval_fit_splits_table_and_side_by_side(subject_dir, tmp_path, capsys):
    subject = load_subject(subject_dir)
    splits = evaluation_views(subject, max_frames=2)
    assert set(splits) == {"train", "novel view", "novel pose"}
    assert all(c in subject.train_cameras and f in subject.train_frames for c, f in splits["train"])
    assert all(c in subject.test_cameras for c, _ in splits["novel view"])
    assert all(f in subject.test_frames for _, f in splits["novel pose"])
    teacher, static = tmp_path / "t.hda.safetensors", tmp_path / "s.hda.safetensors"
    save_avatar(teacher_avatar(), teacher)
    fresh = Avatar.from_init(load_body(), 32, UNetConfig(16, 2), load_config("tiny").gaussians, seed=0, static=True)
    save_avatar(fresh, static)
    code = main(["eval-fit", str(subject_dir), str(teacher), str(static), "--frames", "2", "--preset", "tiny",
                 "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("| avatar"))
    assert header.index("train PSNR box") < header.index("train PSNR full") < header.index("novel view PSNR box")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["t"]["novel pose"]["psnr"] > 45 and result["s (static)"]["novel pose"]["psnr"] < 30
    png = tmp_path / "t.eval.png"
    from PIL import Image
    with Image.open(png) as im:  # 4 rows of ground truth + 2 avatars x (render, error)
        assert im.size[0] % 5 == 0 and im.size[1] > 4 * 14


def test_appearance_stage_starts_the_unet_near_the_fitted_map(subject_dir, tmp_path, capsys):
    """With the appearance stage the first end-to-end steps already beat a fit without it."""
    plain = tmp_path / "a.hda.safetensors"
    staged = tmp_path / "b.hda.safetensors"
    assert main(["fit", str(subject_dir), "--out", str(plain), "--config",
                 str(_config(tmp_path, steps=10, log_every=5, cameras_per_step=2))]) == 0
    config = _config(tmp_path, steps=10, log_every=5, cameras_per_step=2, map_steps=40, regress_steps=60,
                     regress_lr=0.003, precision="auto")
    assert main(["fit", str(subject_dir), "--out", str(staged), "--config", str(config)]) == 0
    rows = _rows(tmp_path / "b.metrics.jsonl")
    maps = [r for r in rows if r.get("stage") == "maps"]
    regress = [r for r in rows if r.get("stage") == "regress"]
    assert maps[-1]["psnr"] > maps[0]["psnr"] and regress[-1]["regression"] < regress[0]["regression"]
    assert [r["step"] for r in rows if "stage" not in r] == [5, 10]
    first = {name: _rows(tmp_path / f"{name}.metrics.jsonl") for name in "ab"}
    assert [r for r in first["b"] if "stage" not in r][0]["psnr"] > [r for r in first["a"] if "stage" not in r][0]["psnr"]
    assert "fit teacher: UNet in " in capsys.readouterr().out
    # the stage-1 map is kept beside the avatar, and fitting it alone gives the same map
    saved = FitPaths.for_output(staged).map
    with safe_open(str(saved), framework="pt") as fh:
        raw = fh.get_tensor("raw")
    avatar, again = fit_map_only(subject_dir, load_config(config))
    assert torch.equal(raw, again) and raw.shape == (avatar.num_gaussians, 59)
    subject = load_subject(subject_dir)
    as_map = evaluate(subject, MapAvatar(avatar, raw), max_frames=1)  # posed by LBS alone
    assert as_map["train"]["psnr"] > evaluate(subject, avatar, max_frames=1)["train"]["psnr"]


def _dataset(subject_dir, root, names):
    for name in names:
        shutil.copytree(subject_dir, root / name)
        meta = json.loads((root / name / "subject.json").read_text())
        (root / name / "subject.json").write_text(json.dumps({**meta, "name": name}))
    return root


def _tensors(path):
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


MEAN_NAMES = ("s0", "s1", "s2", "s3", "s4")


@pytest.fixture(scope="module")
def mean_fits(subject_dir, tmp_path_factory):
    """fit-all --init mean over 5 subjects, once uninterrupted and once interrupted in subject s3's fit
    (after its first checkpoint) and finished by running it again."""
    from hda_backend.fit import fit_all as fa

    root = tmp_path_factory.mktemp("mean_init")
    data = _dataset(subject_dir, root / "data", MEAN_NAMES)
    config = load_config("tiny", {"fit": {"steps": 4, "init_steps": 4, "log_every": 1, "checkpoint_every": 2}})
    whole = fa.fit_all(data, root / "whole", config, progress=False, init="mean")
    real = fa.fit_subject

    def killed_in_s3(subject, out, *args, **kwargs):
        if subject.name == "s3":
            real(subject, out, *args, **{**kwargs, "stop_after": 2})
            raise KeyboardInterrupt
        return real(subject, out, *args, **kwargs)

    fa.fit_subject = killed_in_s3
    try:
        with pytest.raises(KeyboardInterrupt):
            fa.fit_all(data, root / "resumed", config, progress=False, init="mean")
    finally:
        fa.fit_subject = real
    assert (root / "resumed" / "s3.ckpt.safetensors").is_file() and not (root / "resumed" / f"s4{SUFFIX}").exists()
    again = fa.fit_all(data, root / "resumed", config, progress=False, init="mean")
    return {"root": root, "data": data, "whole": whole, "again": again}


def test_fit_all_mean_init_files_are_the_brute_force_means(mean_fits):
    from hda_backend.fit.fit_all import mean_rounds

    assert [list(r) for r in mean_rounds(5)] == [[1], [2, 3], [4]]
    assert [list(r) for r in mean_rounds(9)] == [[1], [2, 3], [4, 5, 6, 7], [8]]
    assert mean_rounds(1) == [] and [list(r) for r in mean_rounds(2)] == [[1]]
    out = mean_fits["root"] / "whole"
    assert sorted(p.name for p in (out / "means").iterdir()) == [
        f"mean_of_first_00002{SUFFIX}", f"mean_of_first_00004{SUFFIX}"]
    for first in (2, 4):
        mean, _ = _tensors(out / "means" / f"mean_of_first_{first:05d}{SUFFIX}")
        fits = [_tensors(out / f"{n}{SUFFIX}")[0] for n in MEAN_NAMES[:first]]
        assert set(mean) == set(fits[0])
        for key, value in mean.items():
            brute = sum(f[key].double() for f in fits) / first
            assert torch.allclose(value.double(), brute, rtol=0, atol=1e-7), key
    # Each subject records the avatar it started from: s1 the first fit, then the means of its round.
    starts = {n: _tensors(out / f"{n}{SUFFIX}")[1]["origin"] for n in MEAN_NAMES}
    assert starts == {"s0": "fit:s0", "s1": f"fit:s1 init:s0{SUFFIX}",
                      "s2": f"fit:s2 init:mean_of_first_00002{SUFFIX}", "s3": f"fit:s3 init:mean_of_first_00002{SUFFIX}",
                      "s4": f"fit:s4 init:mean_of_first_00004{SUFFIX}"}
    # The fit moved s2 away from the mean it started from.
    fitted, start = _tensors(out / f"s2{SUFFIX}")[0], _tensors(out / "means" / f"mean_of_first_00002{SUFFIX}")[0]
    assert any(not torch.equal(fitted[k], start[k]) for k in start)


def test_fit_all_mean_init_resumed_after_an_interruption_equals_an_uninterrupted_run(mean_fits):
    root = mean_fits["root"]
    assert {r["subject"]: r["status"] for r in mean_fits["again"]} == {
        "s0": "skipped", "s1": "skipped", "s2": "skipped", "s3": "fitted", "s4": "fitted"}
    for name in [f"{n}{SUFFIX}" for n in MEAN_NAMES] + [f"means/mean_of_first_{k:05d}{SUFFIX}" for k in (2, 4)]:
        a, b = _tensors(root / "whole" / name)[0], _tensors(root / "resumed" / name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_fit_all_mean_init_under_two_ranks_equals_one_process(mean_fits, tmp_path):
    """Which avatar a subject starts from depends on its index only, so 2 torchrun ranks fit what one did."""
    cfg = _config(tmp_path, steps=4, init_steps=4, log_every=1, checkpoint_every=2)
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
           "-m", "hda_backend.cli", "fit-all", str(mean_fits["data"]), "--out", str(out), "--config", str(cfg),
           "--init", "mean"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    logs = [json.loads(line) for k in (0, 1) for line in (out / f"fit_all.rank{k}.jsonl").read_text().splitlines()]
    assert sorted(r["subject"] for r in logs) == list(MEAN_NAMES) and {r["rank"] for r in logs} == {0, 1}
    for name in [f"{n}{SUFFIX}" for n in MEAN_NAMES] + [f"means/mean_of_first_{k:05d}{SUFFIX}" for k in (2, 4)]:
        a, b = _tensors(mean_fits["root"] / "whole" / name)[0], _tensors(out / name)[0]
        for key in a:  # one thread per rank here, two in-process: float sums may round differently
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (name, key)


def test_fit_all_init_mean_and_init_from_are_exclusive(subject_dir, tmp_path, capsys):
    code = main(["fit-all", str(subject_dir.parent), "--out", str(tmp_path / "f"), "--preset", "tiny",
                 "--init", "mean", "--init-from", str(tmp_path / "x.hda.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--init mean and --init-from" in err
