"""`hda build-default` end to end on a test-sized build: stages, resume after an interruption, redo, the card."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hda_backend import build_default as bd
from hda_backend.avatar.io import SUFFIX, load_avatar
from hda_backend.body import load_body
from hda_backend.cli import main
from hda_backend.diffusion.compact import CompactConfig, compact_model, half_tensors
from hda_backend.diffusion.gallery import gallery_views
from hda_backend.diffusion.sample import load_diffusion, sample_vectors
from hda_backend.diffusion.weights import write_avatar
from hda_backend.errors import HDAError
from hda_backend.render.frames import render_gaussians

# 2 training and 2 held-out subjects; fits from the running mean (subject_002 and _003 start from the mean
# of subject_000 and _001).
TINY = bd.DefaultBuildConfig(
    subjects=2, held_out=2, fit_init="mean", cameras=2, frames=4, size=32, cycles_samples=1, preset="tiny",
    references=1,
    overrides={"fit": {"steps": 12, "init_steps": 6, "checkpoint_every": 6, "log_every": 3},
               "diffusion": {"width": 16, "heads": 2, "ffn": 32, "epochs": 12, "checkpoint_every": 6,
                             "sample_steps": 4}})


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build_default")
    work, out = root / "work", root / "out"
    # An interruption in the middle of the eval stage (as Ctrl-C would do) ...
    original = bd.STAGE_FUNCTIONS["eval"]

    def interrupted(*args):
        raise KeyboardInterrupt

    bd.STAGE_FUNCTIONS["eval"] = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            bd.build_default(out, work, TINY, log=_quiet)
    finally:
        bd.STAGE_FUNCTIONS["eval"] = original
    after_interrupt = json.loads((work / "build.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in (work / "fits").glob(f"*{SUFFIX}")}
    # ... and the same command again finishes the build.
    lines = []
    state = bd.build_default(out, work, TINY, log=lines.append)
    return {"work": work, "out": out, "after_interrupt": after_interrupt, "state": state, "lines": lines,
            "mtimes": mtimes}


def test_an_interrupted_build_is_recorded_and_finished_by_running_it_again(built):
    first = built["after_interrupt"]["stages"]
    assert [first[s]["status"] for s in ("studio", "fits", "diffusion", "bundle")] == ["done"] * 4
    assert first["eval"]["status"] == "interrupted" and first["eval"]["attempts"] == 1
    assert "card" not in first
    stages = built["state"]["stages"]
    assert all(stages[s]["status"] == "done" for s in bd.STAGES)
    assert stages["eval"]["attempts"] == 2
    assert [line for line in built["lines"] if line.endswith("skipped")] == [
        f"[{s}] done ({stages[s]['seconds']:.0f} s), skipped" for s in ("studio", "fits", "diffusion", "bundle")]
    assert stages["studio"]["made"] == 4 * 2 * 4 and stages["fits"]["made"] == 4
    # The finished stages were not redone: the fitted avatars are the same files.
    assert {p: p.stat().st_mtime_ns for p in built["mtimes"]} == built["mtimes"]


def test_the_bundle_holds_the_model_references_card_and_record(built):
    out, work = built["out"], built["work"]
    state = built["state"]
    model = load_diffusion(out / "diffusion.safetensors")
    assert model.config.width == 16 and model.spec.dim == load_diffusion(work / "diffusion" / "diffusion.safetensors").spec.dim
    assert [p.name for p in (out / "references").iterdir()] == [f"subject_000{SUFFIX}"]
    card = (out / "MODEL_CARD.md").read_text()
    for sheet in bd.SHEETS:  # eval-gen's sheets, shipped and listed
        assert (out / sheet).read_bytes() == (work / "eval" / sheet).read_bytes() and f"`{sheet}`" in card
    for row in state["stages"]["eval"]["rows"]:
        assert f"| {row['name']} ({row['kind']}" in card and f"{row['mmd_psnr_db']:.2f}" in card
    assert "4 synthetic subjects" in card and bd.LICENCE in card
    assert "the other 2 (subject_002–subject_003) are held out" in card
    assert "Against the 2 held-out subjects" in card and "Against the 2 training subjects" in card
    assert "On 3 independent seed sets of 2" in card and "| default | 4..5 |" in card
    assert json.loads((out / "build.json").read_text())["stages"]["card"]["status"] == "done"
    model = json.loads((out / "build.json").read_text())["stages"]["bundle"]["model"]
    for trial in model["trials"]:  # each precision tried, with its worst PSNR and its own threshold
        tried = ", ".join(f"{g} in {trial['precisions'][g]}" for g in trial["groups"])
        assert f"{tried}: worst {trial['worst_psnr_db']:.1f} dB (needs {trial['min_psnr_db']:g})" in card


def test_redo_repeats_that_stage_and_every_later_one_only(built):
    before = json.loads((built["work"] / "build.json").read_text())["stages"]
    state = bd.build_default(built["out"], built["work"], TINY, redo="bundle", log=_quiet)
    after = state["stages"]
    for s in ("studio", "fits", "diffusion"):
        assert after[s] == before[s]
    for s in ("bundle", "eval", "card"):
        assert after[s]["attempts"] == before[s]["attempts"] + 1
        assert after[s]["order"] > before["diffusion"]["order"]
    # The redone eval reused the fits' galleries (2 held out, 2 training) from the build's gallery cache.
    report = json.loads((built["work"] / "eval" / "eval_gen.json").read_text())
    assert report["gallery_cache"] == {"folder": str(built["work"] / "gallery_cache"), "hits": 4, "misses": 0}


def test_a_deleted_output_is_rebuilt(built):
    model = built["out"] / "diffusion.safetensors"
    model.unlink()
    state = bd.build_default(built["out"], built["work"], TINY, until="bundle", log=_quiet)
    assert model.is_file() and state["stages"]["diffusion"]["attempts"] == 1


def test_settings_and_record_mismatches_are_one_line_errors(built, tmp_path):
    other = bd.DefaultBuildConfig(**{**TINY.to_dict(), "subjects": 3})
    with pytest.raises(HDAError, match="field 'config' differs"):
        bd.build_default(built["out"], built["work"], other, log=_quiet)
    (tmp_path / "build.json").write_text("{not json")
    with pytest.raises(HDAError, match="build.json: not valid JSON"):
        bd.build_default(tmp_path / "out", tmp_path, TINY, log=_quiet)
    with pytest.raises(HDAError, match="--until 'fitting': expected one of studio, fits"):
        bd.build_default(tmp_path / "out", tmp_path / "w", TINY, until="fitting", log=_quiet)


@pytest.mark.parametrize("argv, message", [
    (["build-default", "--subjects", "1"], "--subjects 1: expected 2..100000"),
    (["build-default", "--subjects", "lots"], "--subjects 'lots': expected a whole number"),
    (["build-default", "--held-out", "1", "--work", "/nonexistent/w"], "--held-out 1: expected 0"),
    (["build-default", "--workers", "0"], "--workers 0: expected 1..1024"),
])
def test_cli_bad_arguments(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_half_tensors_casts_only_the_named_groups():
    tensors = {"model.a": torch.ones(3), "normalizer.mean": torch.ones(3), "other": torch.ones(3),
               "model.count": torch.ones(3, dtype=torch.int64)}
    half = half_tensors(tensors, ("denoiser",))
    assert {k: v.dtype for k, v in half.items()} == {"model.a": torch.float16, "normalizer.mean": torch.float32,
                                                    "other": torch.float32, "model.count": torch.int64}


def test_compact_keeps_float32_where_half_would_change_the_renders(built, tmp_path):
    body = load_body()
    src = built["work"] / "diffusion" / "diffusion.safetensors"
    strict = compact_model(src, tmp_path / "strict.safetensors", body,
                           CompactConfig(seeds=(0, 1), min_psnr_db=1e9, int8_min_psnr_db=1e9))
    assert strict["half"] == []
    with safe_open(str(tmp_path / "strict.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    lax = compact_model(src, tmp_path / "lax.safetensors", body, CompactConfig(seeds=(0, 1), min_psnr_db=-1e9))
    assert lax["half"] == ["denoiser", "normalizer"]
    assert lax["bytes"] < 0.55 * strict["bytes"]
    # The worst PSNR it reports is the one between the two models' samples: recompute one seed by hand.
    a = sample_vectors(load_diffusion(src), [0])
    b = sample_vectors(load_diffusion(tmp_path / "lax.safetensors"), [0])
    assert (a - b).abs().max() > 0  # half precision did change the weights a little
    # Above ~90 dB two renders differ by float rounding alone (MSE < 1e-9), where the two computations
    # may round differently; both saturate there.
    assert min(lax["trials"][-1]["worst_psnr_db"], 90.0) == pytest.approx(
        min(min(_view_psnrs(a[0], b[0], load_diffusion(src), body)), 90.0), abs=0.01)


@torch.no_grad()
def _view_psnrs(a, b, model, body) -> list[float]:
    """PSNR per gallery view between the renders of weight vectors a and b [D], by hand."""
    views = gallery_views(body, CompactConfig().gallery)
    with tempfile.TemporaryDirectory() as tmp:
        posed = [load_avatar(write_avatar(v, model.spec, model.meta, Path(tmp) / f"{i}{SUFFIX}"), body)(views.poses)
                 for i, v in enumerate((a, b))]
    psnrs = []
    for p in range(views.poses.shape[0]):
        for c in range(views.viewmats.shape[0]):
            x, y = (render_gaussians(g.index(p), views.viewmats[c], views.Ks[c], views.size, views.size,
                                     background=views.background)[0].clamp(0, 1) for g in posed)
            psnrs.append(-10 * math.log10(max(float(((x - y) ** 2).mean()), 1e-10)))
    return psnrs


def _vectors(paths):
    out = []
    for path in paths:
        with safe_open(str(path), "pt") as f:
            out.append(torch.cat([f.get_tensor(k).flatten().double() for k in sorted(f.keys())]))
    return torch.stack(out)


def test_held_out_subjects_never_reach_the_diffusion_stage(built):
    work = built["work"]
    fits = {n: work / "fits" / f"{n}{SUFFIX}" for n in ("subject_000", "subject_001", "subject_002", "subject_003")}
    assert all(p.is_file() for p in fits.values())  # every subject is fitted, held-out ones too
    assert built["state"]["stages"]["diffusion"]["avatars"] == 2
    # The normaliser's mean is the mean avatar of what the model was trained on: the two training fits only.
    from hda_backend.diffusion.weights import load_weight_set
    train = load_weight_set([fits["subject_000"], fits["subject_001"]])
    every = load_weight_set(list(fits.values()))
    with safe_open(str(work / "diffusion" / "diffusion.safetensors"), "pt") as f:
        mean = f.get_tensor("normalizer.mean")
    torch.testing.assert_close(mean, train.vectors.double().mean(0).float(), rtol=0, atol=1e-6)
    assert (mean - every.vectors.mean(0)).abs().max() > 1e-3
    # The fits stage ran --init mean: the held-out subjects started from the mean of the first two fits.
    torch.testing.assert_close(_vectors([work / "fits" / "means" / f"mean_of_first_00002{SUFFIX}"])[0],
                               _vectors([fits["subject_000"], fits["subject_001"]]).mean(0), rtol=0, atol=1e-6)


def test_eval_references_the_held_out_fits_and_checks_memorisation_against_training(built):
    report = json.loads((built["work"] / "eval" / "eval_gen.json").read_text())
    assert [Path(p).name for p in report["reference"]["files"]] == [f"subject_002{SUFFIX}", f"subject_003{SUFFIX}"]
    assert report["train"]["count"] == 2 and not report["train"]["same_as_reference"] and report["n"] == 2
    rows = {r["name"]: r for r in built["state"]["stages"]["eval"]["rows"]}
    assert set(rows) == {"default", "copy", "pca", "blend"} and built["state"]["stages"]["eval"]["reference"] == "held-out"
    # The copy row returns training avatars: memorisation against the training set, not the held-out one.
    assert rows["copy"]["vs_train"]["mmd_psnr_db"] == 100.0 and rows["copy"]["mmd_psnr_db"] < 100.0
    assert [s["seed"] for s in rows["default"]["seed_sets"]] == [0, 2, 4]
    # The fits' galleries are kept for a later eval-gen against them: one entry a fit.
    cache = report["gallery_cache"]
    assert cache["folder"] == str(built["work"] / "gallery_cache") and cache["hits"] + cache["misses"] == 4
    assert len(list((built["work"] / "gallery_cache").glob("*.safetensors"))) == 4


def test_the_cli_builds_the_old_settings_from_flags(monkeypatch):
    """`--subjects 24 --held-out 0 --init first --seed-sets 1 --width 24 --projections learned` are the shipped
    24-subject build's settings."""
    record = json.loads((Path(bd.__file__).parents[1] / "assets" / "default" / "build.json").read_text())
    seen = {}
    monkeypatch.setattr(bd, "build_default", lambda out, work, build, **kw: seen.update(build=build, **kw))
    assert main(["build-default", "--subjects", "24", "--held-out", "0", "--init", "first", "--seed-sets", "1",
                 "--width", "24", "--projections", "learned"]) == 0
    assert seen["build"] == bd.DefaultBuildConfig.from_record(record["config"])
    assert main(["build-default"]) == 0 and seen["build"] == bd.DefaultBuildConfig()
    assert seen["compute"] == bd.Compute("auto", 0)  # auto_workers when the fits stage runs
    assert main(["build-default", "--workers", "3", "--device", "cpu"]) == 0 and seen["compute"] == bd.Compute("cpu", 3)
    assert main(["build-default", "--projections", "principal", "--width", "96"]) == 0
    assert seen["build"].overrides == {"diffusion": {"width": 96, "heads": 2, "ffn": 384, "epochs": 600,
                                                     "projections": "principal"}}
    assert seen["build"].model_config().diffusion.projections == "principal"


def test_a_record_from_before_the_split_is_read_with_its_settings(tmp_path):
    """The shipped 24-subject build.json has no held_out / fit_init / eval_seed_sets: it reads as no split."""
    record = json.loads((Path(bd.__file__).parents[1] / "assets" / "default" / "build.json").read_text())
    old = bd.DefaultBuildConfig.from_record(record["config"])
    assert (old.subjects, old.held_out, old.fit_init, old.eval_seed_sets, old.eval_n) == (24, 0, "first", 1, 24)
    assert old.names(held_out=True) == [] and len(old.names()) == 24
    assert "24 synthetic subjects" in bd._data_line(old) and "held out" not in bd._data_line(old)
    (tmp_path / "build.json").write_text(json.dumps(record))
    paths = bd.BuildPaths(tmp_path, tmp_path / "out")
    assert bd.read_state(paths, old)["stages"]["card"]["status"] == "done"
    with pytest.raises(HDAError, match="field 'config' differs"):
        bd.read_state(paths, bd.DefaultBuildConfig())


def test_a_record_from_before_int8_keeps_its_float16_wording():
    """The shipped 24-subject record tried float16 only; its card line says so, as it did."""
    record = json.loads((Path(bd.__file__).resolve().parent.parent / "assets" / "default" / "build.json").read_text())
    model = record["stages"]["bundle"]["model"]
    trials = "; ".join(bd._trial_text(t) for t in model["trials"])
    line = bd._precision_line(model, trials, "refs")
    assert line.startswith("Half precision where it changes nothing measurable")
    assert f"{model['config']['min_psnr_db']:g} dB PSNR" in line
    assert all(f"{'+'.join(t['groups'])} in float16: worst {t['worst_psnr_db']:.1f} dB" in line for t in model["trials"])


def test_the_card_names_seeds_left_out_of_the_precision_trials():
    model = {"config": {"seeds": [0, 1, 2, 3], "min_psnr_db": 50.0, "int8_min_psnr_db": 40.0},
             "precisions": {"denoiser": "float16"}, "half": ["denoiser"], "trials": []}
    assert "(seeds 0..3) render within" in bd._precision_line(dict(model, judged_seeds=[0, 1, 2, 3]), "t", "r")
    line = bd._precision_line(dict(model, judged_seeds=[0, 1, 3]), "t", "r")
    assert "(seeds 0..3; judged on the plausible ones, seeds 0, 1, 3: seed(s) 2 sampled an implausible" in line


def test_fit_eval_scores_every_fit_as_eval_fit_does_and_the_card_shows_it(built):
    from hda_backend.dataset import load_subject
    from hda_backend.fit.evaluate import evaluate

    work, state = built["work"], built["state"]
    entry = state["stages"]["fit-eval"]
    scores = json.loads((work / "fit_eval" / bd.FIT_EVAL_SCORES).read_text())
    assert sorted(scores) == ["subject_000", "subject_001", "subject_002", "subject_003"]
    body = load_body()
    # A subject's record is eval-fit's result for its fit (recomputed here), and the summary is over the records.
    again = evaluate(load_subject(work / "studio" / "subject_003"), load_avatar(work / "fits" / f"subject_003{SUFFIX}", body),
                     bd.FIT_EVAL_FRAMES)
    assert set(scores["subject_003"]) == set(again)
    for split, values in again.items():
        assert scores["subject_003"][split] == pytest.approx(values, rel=1e-5)
    for split, summary in entry["splits"].items():
        box = [scores[n][split]["psnr"] for n in sorted(scores)]
        assert summary["subjects"] == 4 and summary["psnr_mean"] == pytest.approx(sum(box) / 4)
        assert summary["psnr_worst"] == min(box) and scores[summary["worst"]][split]["psnr"] == min(box)
        assert summary["views"] == sum(scores[n][split]["views"] for n in scores)
    assert set(entry["splits"]) == {"train", "novel view", "novel pose"}
    assert (work / "fit_eval" / bd.FIT_EVAL_SHEET).is_file()
    card = (built["out"] / "MODEL_CARD.md").read_text()
    r = entry["splits"]["novel pose"]
    assert f"| novel pose | 4 | {r['views']} | {r['psnr_mean']:.2f} | " in card
    assert f"{r['psnr_worst']:.2f} ({r['worst']})" in card


def test_fit_eval_resumes_per_subject(built, tmp_path):
    """An interrupted fit-eval keeps the subjects it scored; a damaged record is scored again."""
    work = built["work"]
    paths = bd.BuildPaths(work, built["out"])
    scores_file = work / "fit_eval" / bd.FIT_EVAL_SCORES
    saved = scores_file.read_text()
    try:
        scores = json.loads(saved)
        marked = json.loads(json.dumps(scores["subject_000"]))
        marked["train"]["psnr"] = -1.0  # a value no render gives: kept only if the subject is not rescored
        partial = {"subject_000": marked, "subject_001": scores["subject_001"]}
        scores_file.write_text(json.dumps(partial))
        result = bd._stage_fit_eval(paths, TINY, TINY.model_config(), {}, bd.Compute("cpu"))
        assert (result["made"], result["found"]) == (2, 2)
        assert json.loads(scores_file.read_text())["subject_000"]["train"]["psnr"] == -1.0
        assert result["splits"]["train"]["psnr_worst"] == -1.0
        scores_file.write_text("{not json")
        assert bd._stage_fit_eval(paths, TINY, TINY.model_config(), {}, bd.Compute("cpu"))["made"] == 4
    finally:
        scores_file.write_text(saved)


def test_auto_workers_one_process_per_core_as_memory_allows_or_per_gpu(monkeypatch):
    gb = 1024 ** 3
    cpu = torch.device("cpu")
    assert bd.auto_workers(cpu, cpu_count=2, memory_bytes=24 * gb) == 2  # these CI machines
    assert bd.auto_workers(cpu, cpu_count=16, memory_bytes=8 * gb) == 8 * gb // bd.FIT_WORKER_BYTES
    assert bd.auto_workers(cpu, cpu_count=4, memory_bytes=gb) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert bd.auto_workers(torch.device("cuda", 0), cpu_count=64, memory_bytes=gb) == 3


def test_fits_in_two_processes_match_the_in_process_fits(built, tmp_path):
    """The fits stage under torchrun (2 single-threaded ranks, the build's --init mean) fits what the
    in-process stage of the fixture fitted, resumes nothing it need not, and reports every subject."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "studio").symlink_to(built["work"] / "studio")
    paths = bd.BuildPaths(work, tmp_path / "out")
    result = bd._stage_fits(paths, TINY, TINY.model_config(), {}, bd.Compute("cpu", 2))
    assert (result["made"], result["found"], result["unit"]) == (4, 0, "subjects")
    names = [f"subject_{i:03d}{SUFFIX}" for i in range(4)]
    for name in names:
        a, b = load_file(str(built["work"] / "fits" / name)), load_file(str(work / "fits" / name))
        assert a.keys() == b.keys()
        # One thread per rank here, two in the fixture: float sums may round differently and 12 steps of
        # Adam carry that on (a fresh clone's full suite saw single weights differ by more than 1e-4
        # relative). Each tensor must stay within 1e-3 of its norm: in this build a fit and its init, or two
        # subjects, differ by at least 0.04 in every tensor.
        for key in a:
            error = float((a[key].double() - b[key].double()).norm() / a[key].double().norm().clamp_min(1e-12))
            assert error < 1e-3, (name, key, error)
    again = bd._stage_fits(paths, TINY, TINY.model_config(), {}, bd.Compute("cpu", 2))
    assert (again["made"], again["found"]) == (0, 4)


def test_failed_fit_processes_are_one_line(tmp_path):
    paths = bd.BuildPaths(tmp_path / "work", tmp_path / "out")
    (tmp_path / "work" / "studio").mkdir(parents=True)  # no subjects: fit-all refuses on every rank
    with pytest.raises(HDAError, match=r"^fits: the 2 fit-all processes ended with exit status \d+ .*resume"):
        bd._stage_fits(paths, TINY, TINY.model_config(), {}, bd.Compute("cpu", 2))


def _report(**model):
    row = {"name": "default", "colourfulness_ratio": 0.9, "sharpness_ratio": 0.84, "precision": 1.0, "recall": 0.5,
           "colour_fd": 100.0, "cov_psnr": 0.6, "one_nna_psnr": 0.5, "nearest_train_rms": 0.02,
           "closest_train_pair_rms": 0.01, "no_copies": True, "seconds_per_identity": 0.3,
           "seed_sets": [{"one_nna_psnr": v} for v in (0.5, 0.61, 0.4)]}
    row.update(model)
    copy = {"name": "copy", "colourfulness_ratio": 0.97, "sharpness_ratio": 0.96, "precision": 0.938, "recall": 0.906,
            "colour_fd": 1689.1, "cov_psnr": 0.469, "one_nna_psnr": 0.547}
    return {"train": {"same_as_reference": False},
            "rows": [row, copy, {"name": "pca", "colour_fd": 120.0, "precision": 1.0},
                     {"name": "blend", "colour_fd": 90.0, "precision": 0.8}],
            "held_out_vs_train": {"nearest_train_rms": 0.0374, "closest_train_pair_rms": 0.0462, "no_copies": False}}


def test_goal_rows_compare_each_measure_with_its_goal():
    rows = {r.goal.split(" ")[0] + (" base" if "baselines" in r.goal else ""): (r.measured, r.met)
            for r in bd.goal_rows(_report(), 64 * 2 ** 20)}
    assert rows["colourfulness"] == ("0.90", True) and rows["sharpness"] == ("0.84", False)  # 0.84 < 0.85
    assert rows["precision"] == ("100.0 %", True) and rows["recall"] == ("50.0 %", True)  # at the goal counts
    assert rows["colour base"] == ("100 (PCA 120, blend 90)", False)  # the blend's is lower
    assert rows["precision base"][1] is False  # a tie with PCA's 100 % is not better
    assert rows["COV"] == ("60.0 %", True)
    assert rows["1-NNA"] == ("50.0 %, 61.0 %, 40.0 %", False)  # 61 % is outside 40-60 %
    assert rows["no"][1] is True and rows["≤"] == ("0.30 s", True)
    assert rows["model,"] == ("64.0 MiB", True)
    assert bd.goal_rows(_report(), 64 * 2 ** 20 + 1)[-1].met is False
    better = {r.goal: r.met for r in bd.goal_rows(_report(colour_fd=80.0, precision=1.0, seed_sets=None), 1)}
    assert better["colour FD below the PCA and blend baselines'"] and better["1-NNA within 40.0 %–60.0 % on each of 1 seed sets"]
    assert bd.goal_rows({"train": {"same_as_reference": True}, "rows": []}, 1) == []


def test_goal_rows_show_what_real_people_score():
    """The real-people column: the copy baseline's values against the held-out set, and the held-out
    subjects' own no-copies check; "—" where a report has neither (or the goal is not about samples)."""
    real = [r.real for r in bd.goal_rows(_report(), 1)]
    assert real == ["0.97", "0.96", "93.8 %", "90.6 %", "1689", "93.8 %", "46.9 %", "54.7 %",
                    "nearest 0.0374 vs pair 0.0462 RMS", "—", "—"]
    old = _report()
    old["rows"] = [r for r in old["rows"] if r["name"] != "copy"]
    del old["held_out_vs_train"]
    assert {r.real for r in bd.goal_rows(old, 1)} == {"—"}


def test_the_card_says_which_goals_the_model_meets(built):
    report = json.loads((built["work"] / "eval" / "eval_gen.json").read_text())
    rows = bd.goal_rows(report, bd.bundle_bytes(bd.BuildPaths(built["work"], built["out"])))
    card = (built["out"] / "MODEL_CARD.md").read_text()
    assert f"{sum(r.met for r in rows)} of {len(rows)} met" in card
    for r in rows:
        assert f"| {r.goal} | {r.measured} | {r.real} | {'yes' if r.met else '**no**'} |" in card
