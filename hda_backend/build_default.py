"""``hda build-default``: the embedded default model, from nothing, in one resumable command.

Stages, in order (WORK defaults to ``build/default``, OUT to ``assets/default``):

- ``studio``     ``hda synth``: training and held-out subjects rendered by Cycles  -> WORK/studio/
- ``fits``       ``hda fit-all``: the first subject in full, the rest from it (or the running mean) -> WORK/fits/
- ``diffusion``  ``hda train-diffusion`` on the training subjects' fits only        -> WORK/diffusion/
- ``bundle``     int8 / float16 where renders keep (:mod:`.diffusion.compact`) + reference avatars -> OUT/
- ``eval``       ``hda eval-gen`` of the bundled model against the held-out fits (the training fits
                 for memorisation), with the copy, PCA and blend baselines
- ``fit-eval``   ``hda eval-fit``'s splits on every fit (stage 1's quality, for the card) -> WORK/fit_eval/
- ``card``       OUT/MODEL_CARD.md and OUT/build.json

The studio's subjects 0 .. subjects-1 are the training set; the next ``held_out`` are fitted like them but
never reach the diffusion stage: they are eval-gen's reference set, as in the paper's protocol. A build
with ``held_out`` 0 (every record made before the split) evaluates against the training fits.

Every stage resumes where it stopped (synth skips finished images, fit-all finished subjects and resumes
checkpoints, train-diffusion resumes its checkpoint, fit-eval keeps the subjects it scored), so an interrupted build is finished by running the
same command again. WORK/build.json records each stage's status, its wall time summed over attempts and
what it found already done; a stage is skipped when it is done, its outputs exist and nothing before it
was redone since. ``--redo STAGE`` redoes a stage (and so every later one).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .atomic import write_text
from .avatar.io import SUFFIX
from .config import Config, load_config
from .devices import resolve_device
from .errors import HDAError

# fit-eval scores stage 1 and depends on the fits only; it comes after eval so that adding or redoing it
# never redoes the diffusion model.
STAGES = ("studio", "fits", "diffusion", "bundle", "eval", "fit-eval", "card")
STATE_FORMAT = "hda-build-default"
MODEL_FILE = "diffusion.safetensors"
CARD_FILE = "MODEL_CARD.md"
LICENCE = "CC0-1.0"
# eval-gen's contact sheets shipped beside the model: every row's first samples beside their nearest
# reference (held-out) subject, and all 32 samples of the model beside their nearest training subject.
SHEETS = ("samples_vs_nearest.png", "default_vs_nearest_training.png")
# fit-eval: frames per split and motion for every fit (`hda eval-fit --frames`). At the build's studio
# settings that is 24 views a subject (train 4, novel view 4, novel pose 2 frames x 8 cameras), 3,072 over
# 128 subjects: enough for the card's mean and spread at a few seconds a subject on these 2 cores
# (`hda eval-fit --frames 2` of one fit: 11.8 s wall with start-up and its sheet, at load 3).
FIT_EVAL_FRAMES = 2
# What the default model is built to reach (the card's "Against its goals" table), against the held-out
# subjects: samples as colourful and sharp as real people, k-NN precision/recall, coverage, 1-NNA near
# chance on every seed set, no copies, fast sampling, and a bundle the extension can ship.
GOALS = {"colourfulness_ratio": 0.85, "sharpness_ratio": 0.85, "precision": 0.70, "recall": 0.50,
         "cov_psnr": 0.60, "one_nna_band": (0.40, 0.60), "seconds_per_identity": 2.0}
BUNDLE_LIMIT = 64 * 2 ** 20  # bytes of OUT's model, references and sheets: the extension's download
FIT_EVAL_SCORES = "scores.json"  # subject -> eval-fit's result, rewritten after every subject
FIT_EVAL_SHEET = "worst_novel_pose.png"  # eval-fit's side by side for the subject lowest on the held-out motion


@dataclass(frozen=True)
class DefaultBuildConfig:
    """Everything that decides the default model; written into build.json and the model card."""

    subjects: int = 96  # training subjects: the diffusion stage learns from these only
    # Further studio subjects, fitted like the others, that stage 2 never sees: eval-gen's reference set.
    # 32 = the 32 sample seeds, so 1-NNA classifies 32 samples against 32 references (balanced).
    held_out: int = 32
    fit_init: str = "first"  # fit-all --init: later subjects from subject_000's fit, or the running mean
    cameras: int = 8
    frames: int = 30  # per subject; a quarter of them show the held-out motion
    size: int = 256
    studio_seed: int = 0
    cycles_samples: int = 16
    preset: str = "cpu"  # fitting and diffusion recipe; `overrides` are applied on top
    # The cpu preset's width-64 denoiser is 77M parameters (150 MB in float16): its per-layer projections
    # scale with width x UNet size. Each layer's x0 is decoded linearly from one width-sized token, so
    # samples live in a width-dimensional subspace per layer; below N-1 dimensions samples collapse onto
    # each other, and a narrow decoder makes blends: on weight sets of known structure width 48 gave new
    # people a coefficient norm of 0.73 against width 24's 0.53 (README, Stage 2). Width 48 is the widest
    # that fits the 64 MB bundle, with its projections in int8 (62.4 MB model, README Default model).
    # Principal projections (--projections principal) did better on those weight sets but worse on 22 real
    # studio fits (README, Stage 2), so they are not the default until the 96 fits decide.
    overrides: dict = field(default_factory=lambda: {"diffusion": {"width": 48, "heads": 2, "ffn": 192, "epochs": 600}})
    references: int = 2  # fitted avatars shipped for tests, spread over the subjects
    eval_seed: int = 0  # eval-gen samples seeds eval_seed .. eval_seed + n - 1, n = held_out (or subjects)
    eval_seed_sets: int = 3  # MMD/COV/1-NNA also on the next seed sets of n (eval-gen --seed-sets)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def total(self) -> int:
        """Subjects in the studio and fits: training and held out."""
        return self.subjects + self.held_out

    @property
    def eval_n(self) -> int:
        return self.held_out or self.subjects

    def names(self, held_out: bool = False) -> list[str]:
        """The training subjects' names, or the held-out ones'."""
        return [f"subject_{i:03d}" for i in (range(self.subjects, self.total) if held_out else range(self.subjects))]

    @classmethod
    def from_record(cls, config: dict) -> "DefaultBuildConfig":
        """The settings of a build.json (fields added since it was written take their earlier meaning)."""
        return cls(**{**LEGACY, **config})

    def model_config(self) -> Config:
        return load_config(self.preset, self.overrides)


# What a build recorded before a field existed did: no held-out split, every fit from subject_000, one
# seed set. A record without them is read as having them (read_state, DefaultBuildConfig.from_record).
LEGACY = {"held_out": 0, "fit_init": "first", "eval_seed_sets": 1}


def check_build(build: DefaultBuildConfig) -> None:
    from .fit.fit_all import INITS

    if build.subjects < 2:
        raise HDAError(f"--subjects {build.subjects}: expected at least 2 training subjects")
    if build.held_out == 1 or build.held_out < 0:
        raise HDAError(f"--held-out {build.held_out}: expected 0 (evaluate against the training fits) or at least 2")
    if build.fit_init not in INITS:
        raise HDAError(f"fit_init {build.fit_init!r}: expected one of {', '.join(INITS)}")
    if build.eval_seed_sets < 1:
        raise HDAError(f"eval_seed_sets {build.eval_seed_sets}: expected at least 1")


@dataclass(frozen=True)
class BuildPaths:
    work: Path
    out: Path

    @property
    def state(self) -> Path:
        return self.work / "build.json"

    @property
    def studio(self) -> Path:
        return self.work / "studio"

    @property
    def fits(self) -> Path:
        return self.work / "fits"

    @property
    def diffusion(self) -> Path:
        return self.work / "diffusion" / MODEL_FILE

    def fit_files(self, names: list[str]) -> list[Path]:
        return [self.fits / f"{n}{SUFFIX}" for n in names]

    @property
    def eval(self) -> Path:
        return self.work / "eval"

    @property
    def fit_eval(self) -> Path:
        return self.work / "fit_eval"

    @property
    def gallery_cache(self) -> Path:
        """eval-gen's renders of the fits (:mod:`.diffusion.gallery_cache`): a redone eval stage, or an
        eval-gen of another model against the same fits (``--gallery-cache``), renders them once."""
        return self.work / "gallery_cache"

    @property
    def model(self) -> Path:
        return self.out / MODEL_FILE

    @property
    def references(self) -> Path:
        return self.out / "references"

    @property
    def card(self) -> Path:
        return self.out / CARD_FILE


# Memory one single-threaded fit process holds (the `cpu` preset at 256²: about 0.85 GB resident, measured),
# with headroom: auto_workers starts no more processes than memory holds at this much each.
FIT_WORKER_BYTES = 2 * 1024 ** 3


@dataclass(frozen=True)
class Compute:
    """Where and how a build computes; not part of its record (the recipe decides the model, these only how
    fast it is made). ``device``: auto | cpu | cuda[:N] for fitting, diffusion training and the evaluations;
    ``workers``: fit-all processes for the fits stage (1: in this process; 0: :func:`auto_workers`)."""

    device: str = "auto"
    workers: int = 1


def auto_workers(device: torch.device, cpu_count: int | None = None, memory_bytes: int | None = None) -> int:
    """The fits stage's processes when none are asked for: one per CUDA device on CUDA; on the CPU one
    single-threaded process per core, as many as memory holds at FIT_WORKER_BYTES each. Fits are small
    convolutions that two threads barely speed up: on 2 cores, two one-thread processes fitted 1.80× as many
    subjects per hour as one two-thread process, to the same PSNR (README, Default model)."""
    if device.type == "cuda":
        return max(1, torch.cuda.device_count())
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): cores decide
            memory_bytes = cores * FIT_WORKER_BYTES
    return max(1, min(cores, memory_bytes // FIT_WORKER_BYTES))


def reference_subjects(subjects: int, count: int) -> list[int]:
    """``count`` subject indices spread evenly over 0..subjects-1 (the first always included)."""
    count = min(count, subjects)
    return sorted({round(i * subjects / count) for i in range(count)})


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


def read_state(paths: BuildPaths, build: DefaultBuildConfig) -> dict:
    """WORK/build.json, or a fresh state; a state made with another config is refused."""
    if not paths.state.is_file():
        return {"format": STATE_FORMAT, "config": build.to_dict(), "counter": 0, "stages": {}}
    try:
        state = json.loads(paths.state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HDAError(f"{paths.state}: not valid JSON; delete it to restart the build record") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise HDAError(f"{paths.state}: field 'format' is not '{STATE_FORMAT}'; delete it to restart the record")
    if {**LEGACY, **(state.get("config") or {})} != json.loads(json.dumps(build.to_dict())):
        raise HDAError(f"{paths.state}: field 'config' differs from this build's settings; use another --work "
                       "folder or delete it to rebuild with the new settings")
    return state


def outputs_exist(stage: str, paths: BuildPaths, build: DefaultBuildConfig) -> bool:
    names = build.names() + build.names(held_out=True)
    return {
        "studio": lambda: all((paths.studio / n / "subject.json").is_file() for n in names),
        "fits": lambda: all((paths.fits / f"{n}{SUFFIX}").is_file() for n in names),
        "diffusion": lambda: paths.diffusion.is_file(),
        "bundle": lambda: paths.model.is_file() and paths.references.is_dir(),
        "eval": lambda: (paths.eval / "eval_gen.json").is_file(),
        "fit-eval": lambda: set(names) <= set(_read_fit_scores(paths)) and (paths.fit_eval / FIT_EVAL_SHEET).is_file(),
        "card": lambda: paths.card.is_file(),
    }[stage]()


def stage_is_current(state: dict, stage: str, paths: BuildPaths, build: DefaultBuildConfig) -> bool:
    entry = state["stages"].get(stage, {})
    if entry.get("status") != "done" or not outputs_exist(stage, paths, build):
        return False
    before = STAGES[:STAGES.index(stage)]
    return all(state["stages"].get(s, {}).get("order", 0) <= entry["order"] for s in before)


# ---------------------------------------------------------------------------------------------------
# The stages: each returns what it did, recorded in build.json (the card also reads the record).


def _stage_studio(paths: BuildPaths, build: DefaultBuildConfig, config: Config, state: dict,
                  compute: Compute) -> dict:
    from .studio.synth import SynthOptions, pending_images, synth

    total = build.total * build.cameras * build.frames
    left = sum(len(pending_images(paths.studio / f"subject_{i:03d}", build.cameras, build.frames, build.size))
               if (paths.studio / f"subject_{i:03d}").is_dir() else build.cameras * build.frames
               for i in range(build.total))
    synth(SynthOptions(subjects=build.total, cameras=build.cameras, frames=build.frames, size=build.size,
                       seed=build.studio_seed, out=paths.studio, samples=build.cycles_samples))
    return {"made": left, "found": total - left, "unit": "images"}


def _stage_fits(paths: BuildPaths, build: DefaultBuildConfig, config: Config, state: dict,
                compute: Compute) -> dict:
    from .fit.fit_all import fit_all

    workers = compute.workers or auto_workers(resolve_device(compute.device))
    if workers > 1:
        log = _fit_all_processes(paths, build, workers, compute.device)
    else:
        log = fit_all(paths.studio, paths.fits, config, device=compute.device, init=build.fit_init)
    made = sum(row["status"] == "fitted" for row in log)
    return {"made": made, "found": len(log) - made, "unit": "subjects",
            "logged_seconds": round(sum(fit_seconds(paths.fits).values()), 1)}


def _fit_all_processes(paths: BuildPaths, build: DefaultBuildConfig, workers: int, device: str) -> list[dict]:
    """`hda fit-all` of the studio under torchrun in ``workers`` processes (gloo on the CPU, one GPU
    each with CUDA), with the build's recipe; every rank's log rows. Progress is rank 0's; Ctrl-C stops them
    all, and the next run resumes as the in-process path does."""
    import yaml

    recipe = paths.work / "fit_recipe.yaml"  # load_config(preset, overrides), as a file the ranks read
    write_text(recipe, yaml.safe_dump({"preset": build.preset, **build.overrides}, sort_keys=True))
    for stale in paths.fits.glob("fit_all.rank*.jsonl"):
        stale.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
               "-m", "hda_backend.cli", "fit-all", str(paths.studio), "--out", str(paths.fits),
               "--config", str(recipe), "--init", build.fit_init, "--device", device]
    code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if code != 0:
        raise HDAError(f"fits: the {workers} fit-all processes ended with exit status {code} (their "
                       "output is above); run the same command again to resume the fits")
    return [json.loads(line) for k in range(workers)
            for line in (paths.fits / f"fit_all.rank{k}.jsonl").read_text().splitlines()]


def fit_seconds(fits: Path) -> dict[str, float]:
    """Subject -> the fitting wall time its own step log records (resumed runs included)."""
    from .steplog import read_step_log

    out = {}
    for log in sorted(fits.glob("*.metrics.jsonl")):
        rows = read_step_log(log, math.inf)
        if rows:
            out[log.name[:-len(".metrics.jsonl")]] = float(rows[-1]["seconds"])
    return out


def _stage_diffusion(paths: BuildPaths, build: DefaultBuildConfig, config: Config, state: dict,
                     compute: Compute) -> dict:
    from .diffusion.train import DiffusionPaths, train_diffusion

    paths.diffusion.parent.mkdir(parents=True, exist_ok=True)
    resume = DiffusionPaths.for_output(paths.diffusion).checkpoint.exists()
    fits = paths.fit_files(build.names())  # the training subjects only: never a held-out one
    result = train_diffusion(fits, paths.diffusion, config.diffusion, resume=resume, device=compute.device)
    return {"avatars": len(fits), "steps": result.steps, "logged_seconds": round(result.seconds, 1), "parameters": result.parameters,
            "final_loss": result.final_loss}


def _stage_bundle(paths: BuildPaths, build: DefaultBuildConfig, config: Config, state: dict,
                  compute: Compute) -> dict:
    from .body import load_body
    from .diffusion.compact import compact_avatar, compact_model

    body = load_body(config.body.path, config.body.num_betas)
    model = compact_model(paths.diffusion, paths.model, body)
    if paths.references.is_dir():
        shutil.rmtree(paths.references)
    references = {}
    for i in reference_subjects(build.subjects, build.references):
        name = f"subject_{i:03d}{SUFFIX}"
        references[name] = compact_avatar(paths.fits / name, paths.references / name, body)
    return {"model": model, "references": references}


def _stage_eval(paths: BuildPaths, build: DefaultBuildConfig, config: Config, state: dict,
                compute: Compute) -> dict:
    from .body import load_body
    from .diffusion.eval_gen import EvalGenConfig, evaluate_generation
    from .diffusion.gallery import GalleryConfig
    from .fit.losses import load_lpips

    perceptual, lpips_status = load_lpips(config.fit.lpips_alexnet)
    eval_config = EvalGenConfig(n=build.eval_n, seed=build.eval_seed, seed_sets=build.eval_seed_sets,
                                gallery=GalleryConfig(fov_deg=config.render.fov_deg, backend=config.render.backend,
                                                      device=str(resolve_device(compute.device))))
    training = paths.fit_files(build.names())
    # Held out: the reference set is the fits stage 2 never saw and the training fits are the memorisation
    # check; without a split both are the training fits.
    reference = paths.fit_files(build.names(held_out=True)) if build.held_out else training
    report = evaluate_generation(reference, paths.eval, load_body(config.body.path, config.body.num_betas),
                                 models={"default": paths.model}, train=training if build.held_out else None,
                                 config=eval_config, lpips=perceptual,
                                 notes=(lpips_status, "FID/KID off: no local Inception weights"),
                                 gallery_cache=paths.gallery_cache)
    keys = ("name", "kind", "mmd_psnr_db", "cov_psnr", "one_nna_psnr", "colour_fd", "colourfulness_ratio",
            "sharpness_ratio", "precision", "recall", "no_copies", "vs_train", "seed_sets", "plausible_fraction",
            "seconds_per_identity")
    return {"reference": "held-out" if build.held_out else "training",
            "rows": [{k: r[k] for k in keys if k in r} for r in report["rows"]]}


def _read_fit_scores(paths: BuildPaths) -> dict:
    """fit-eval's scores so far (subject -> eval-fit result); {} when none or unreadable (then rescored)."""
    try:
        scores = json.loads((paths.fit_eval / FIT_EVAL_SCORES).read_text())
    except (OSError, ValueError):
        return {}
    return scores if isinstance(scores, dict) else {}


def _stage_fit_eval(paths: BuildPaths, build: DefaultBuildConfig, config: Config, state: dict,
                    compute: Compute) -> dict:
    """Every fit scored like `hda eval-fit --frames FIT_EVAL_FRAMES`: box PSNR/SSIM (the stage-1 protocol) and
    full-frame PSNR per split; resumable per subject. Returns the per-split summary the card shows."""
    import numpy as np
    from tqdm import tqdm

    from .avatar.io import load_avatar
    from .body import load_body
    from .dataset import load_subject
    from .fit.evaluate import SPLITS, comparison_sheet, evaluate
    from .images import save_png

    body = load_body(config.body.path, config.body.num_betas)
    target = resolve_device(compute.device)
    backend = config.render.backend
    names = build.names() + build.names(held_out=True)
    paths.fit_eval.mkdir(parents=True, exist_ok=True)
    scores = {n: r for n, r in _read_fit_scores(paths).items() if n in names}
    found = len(scores)
    for name in tqdm(names, desc="fit-eval", unit="subject"):
        if name not in scores:
            avatar = load_avatar(paths.fits / f"{name}{SUFFIX}", body).to(target)
            scores[name] = evaluate(load_subject(paths.studio / name).to(target), avatar, FIT_EVAL_FRAMES, backend)
            _write_json(paths.fit_eval / FIT_EVAL_SCORES, scores)
    summary = {}
    for split in SPLITS:
        rows = {n: r[split] for n, r in scores.items() if split in r}
        if not rows:
            continue
        box = np.array([r["psnr"] for r in rows.values()])
        worst = min(rows, key=lambda n: rows[n]["psnr"])
        summary[split] = {"subjects": len(rows), "views": int(sum(r["views"] for r in rows.values())),
                          "psnr_mean": float(box.mean()), "psnr_median": float(np.median(box)),
                          "psnr_p10": float(np.percentile(box, 10)), "psnr_worst": float(box.min()),
                          "worst": worst, "ssim_mean": float(np.mean([r["ssim"] for r in rows.values()])),
                          "psnr_full_mean": float(np.mean([r["psnr_full"] for r in rows.values()]))}
    split = "novel pose" if "novel pose" in summary else next(iter(summary))
    worst = summary[split]["worst"]
    subject = load_subject(paths.studio / worst).to(target)
    avatar = load_avatar(paths.fits / f"{worst}{SUFFIX}", body).to(target)
    save_png(paths.fit_eval / FIT_EVAL_SHEET, np.asarray(comparison_sheet(subject, [(worst, avatar)], backend=backend)))
    return {"made": len(names) - found, "found": found, "unit": "subjects", "frames": FIT_EVAL_FRAMES,
            "splits": summary}


def _stage_card(paths: BuildPaths, build: DefaultBuildConfig, config: Config, state: dict,
                compute: Compute) -> dict:
    state["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for name in SHEETS:
        if (paths.eval / name).is_file():
            shutil.copy2(paths.eval / name, paths.out / name)
    write_text(paths.card, model_card(paths, build, config, state))
    return {}


STAGE_FUNCTIONS: dict[str, Callable] = {"studio": _stage_studio, "fits": _stage_fits,
                                        "diffusion": _stage_diffusion, "bundle": _stage_bundle,
                                        "eval": _stage_eval, "fit-eval": _stage_fit_eval, "card": _stage_card}


def build_default(out, work, build: DefaultBuildConfig = DefaultBuildConfig(), redo: str | None = None,
                  until: str | None = None, log: Callable[[str], None] = print,
                  compute: Compute = Compute()) -> dict:
    """Run (or finish) the stages up to ``until`` (default: all); returns the build state. ``compute``: the
    device and the fits stage's processes (not part of the build's record)."""
    for name, value in (("--redo", redo), ("--until", until)):
        if value is not None and value not in STAGES:
            raise HDAError(f"{name} {value!r}: expected one of {', '.join(STAGES)}")
    check_build(build)
    paths = BuildPaths(Path(work), Path(out))
    config = build.model_config()
    state = read_state(paths, build)
    paths.work.mkdir(parents=True, exist_ok=True)
    paths.out.mkdir(parents=True, exist_ok=True)
    last = STAGES.index(until) if until else len(STAGES) - 1
    redo_from = STAGES.index(redo) if redo else len(STAGES)
    for index, stage in enumerate(STAGES[:last + 1]):
        if index < redo_from and stage_is_current(state, stage, paths, build):
            log(f"[{stage}] done ({state['stages'][stage]['seconds']:.0f} s), skipped")
            continue
        entry = state["stages"].setdefault(stage, {"seconds": 0.0, "attempts": 0})
        entry.update(status="running", attempts=entry["attempts"] + 1)
        _write_json(paths.state, state)
        log(f"[{stage}] running")
        start = time.perf_counter()
        try:
            result = STAGE_FUNCTIONS[stage](paths, build, config, state, compute)
        except BaseException:
            entry["status"] = "interrupted"
            raise
        else:
            state["counter"] += 1
            entry.update(result, status="done", order=state["counter"])
        finally:
            entry["seconds"] = round(entry["seconds"] + time.perf_counter() - start, 1)
            _write_json(paths.state, state)
        if stage == "card":  # the bundle carries the finished record
            _write_json(paths.out / "build.json", state)
        log(f"[{stage}] done in {entry['seconds']:.0f} s")
    return state


# ---------------------------------------------------------------------------------------------------
# The model card


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _bundle_files(paths: BuildPaths) -> list[tuple[Path, str]]:
    """(file, what it is) of every bundle file but the card and the record, those that exist."""
    files = [(paths.model, "the diffusion model: EMA denoiser weights, normaliser statistics, metadata")]
    files += [(p, "a fitted reference avatar (tests, comparisons)") for p in sorted(paths.references.glob(f"*{SUFFIX}"))]
    files += [(paths.out / "samples_vs_nearest.png", "samples beside their nearest reference subject (held out where the build has a split)"),
              (paths.out / "default_vs_nearest_training.png", "every sample of the model beside its nearest training subject")]
    return [(path, what) for path, what in files if path.is_file()]


def bundle_bytes(paths: BuildPaths) -> int:
    """The bytes of the bundle's model, references and sheets (the card and the record add ~20 kB)."""
    return sum(path.stat().st_size for path, _ in _bundle_files(paths))


def _files_table(paths: BuildPaths) -> list[str]:
    files = [(path, what, path.stat().st_size) for path, what in _bundle_files(paths)]
    return ["| file | contents | size |", "|---|---|---|",
            *[f"| `{path.relative_to(paths.out)}` | {what} | {_mb(size)} |" for path, what, size in files],
            f"| all (with this card and build.json) | | {_mb(sum(size for *_, size in files))} |"]


def _config_lines(build: DefaultBuildConfig, config: Config, state: dict) -> list[str]:
    d, f, u = config.diffusion, config.fit, config.unet
    diff = state["stages"].get("diffusion", {})
    start = ("the running mean of the fits before it (`fit-all --init mean`: subjects 2^k..2^(k+1)−1 start from "
             "the mean of the first 2^k)" if build.fit_init == "mean" else "subject_000's fit (`--init-from`)")
    return [
        f"- Avatars (stage 1): the `{config.preset}` preset. UNet width {u.width}, {u.levels} levels, on a "
        f"{config.uv.res}² UV map; Gaussians with SH degree {config.gaussians.sh_degree}. subject_000 fitted from "
        f"the seeded initialisation (colour maps {f.map_steps}, UNet regression {f.regress_steps}, end to end "
        f"{f.steps} steps); every later one starts from {start} (maps {f.init_map_steps}, regression "
        f"{f.init_regress_steps}, end to end {f.init_steps}). Learning rate {f.lr:g} with a cosine decay to "
        f"×{f.lr_final:g}; images {config.render.size}².",
        f"- Diffusion (stage 2), on the {diff.get('avatars', build.subjects)} training fits: `{d.tokenizer}` tokens (one per conv layer) "
        f"with {_projection_words(d)}, width {d.width}, {d.blocks} blocks, "
        f"{d.heads} heads, feed-forward {d.ffn}; {diff.get('parameters', 0):,} parameters. T = {d.timesteps}, "
        f"betas {d.beta_start:g}..{d.beta_end:g}; {d.epochs} epochs of batch {d.batch} = {diff.get('steps', '?')} "
        f"steps; EMA {d.ema_decay}; `{d.normalization}` normalisation; {d.prediction} prediction. Sampling: DDIM, "
        f"{d.sample_steps} steps, eta {d.sample_eta:g}.",
    ]


def _projection_words(d) -> str:
    if d.projections == "principal":
        return (f"principal projections (each layer's top {d.principal_rank or d.width} principal directions of "
                "the training fits, fixed and tied, with learned heads)")
    return "tied learned projections" if d.tied_projections else "learned projections"


def _time_lines(state: dict) -> list[str]:
    lines = ["| stage | wall time of this build | work done | compute its own logs record |", "|---|---|---|---|"]
    total = 0.0
    for stage in STAGES:
        e = state["stages"].get(stage)
        if not e:
            continue
        total += e["seconds"]
        work = f"{e['made']} {e['unit']} made, {e['found']} found done" if "unit" in e else ""
        logged = f"{e['logged_seconds'] / 60:.1f} min" if "logged_seconds" in e else ""
        lines.append(f"| {stage} | {e['seconds'] / 60:.1f} min | {work} | {logged} |")
    lines.append(f"| **all** | **{total / 60:.1f} min** | | |")
    return lines


def _data_line(build: DefaultBuildConfig) -> str:
    split = (f" Subjects 0–{build.subjects - 1} are the training set; the other {build.held_out} "
             f"(subject_{build.subjects:03d}–subject_{build.total - 1:03d}) are held out: fitted the same way, never "
             "seen by the diffusion stage, and the evaluation's reference set." if build.held_out else "")
    return (f"{build.total} synthetic subjects from `hda synth` (seed {build.studio_seed}): the bundled open body "
            f"with random shape, skin, hair and clothing, {build.cameras} cameras at two heights, {build.frames} frames "
            f"({build.size}², Cycles {build.cycles_samples} spp; three quarters of the frames are the training motion, "
            f"a quarter a held-out one).{split} No real person, no scan and no SMPL-X data are in it.")


def _eval_lines(build: DefaultBuildConfig, report: dict) -> list[str]:
    from .diffusion.eval_gen import format_seed_sets_table, format_table, format_train_table

    n = report["n"]
    rows = (f"Rows: the bundled model, sampled with seeds {build.eval_seed}..{build.eval_seed + n - 1}; `copy` returns "
            "training avatars (the memorisation ceiling); `pca` samples a Gaussian in the training set's PCA space; "
            "`blend` averages two random training avatars (what a model that only interpolates makes). Colour FD, "
            "the colourfulness and sharpness ratios and precision/recall compare per-part colour and texture "
            "statistics of the renders. Distances are PSNR between renders of a fixed gallery (poses × cameras); "
            "the protocol is in `eval_gen.md` of the build's eval folder.")
    if report["train"]["same_as_reference"]:
        lines = [format_table(report), "", rows + " The reference set is the training fits (this build has no "
                 "held-out split); memorisation shows in 1-NNA (copies → 0%) and the novelty columns."]
    else:
        lines = [f"Against the {report['reference']['count']} held-out subjects (the paper's protocol: stage 2 never "
                 "saw them):", "", format_table(report), "", rows, "",
                 f"Against the {report['train']['count']} training subjects (memorisation: copies give 100 dB and 0% "
                 "1-NNA; *no copies*: no sample nearer a training subject, RMS over the gallery, than the closest "
                 "training pair is to each other):", "", format_train_table(report)]
    if format_seed_sets_table(report):
        lines += ["", f"On {build.eval_seed_sets} independent seed sets of {n} (the same reference set):", "",
                  format_seed_sets_table(report)]
    return lines


def _fit_eval_lines(state: dict) -> list[str]:
    """The fits' quality section (fit-eval's summary); none for a record made before the stage existed."""
    entry = state["stages"].get("fit-eval")
    if not entry or entry.get("status") != "done":
        return []
    lines = ["## Avatars: how well the fits reproduce their subjects (stage 1)", "",
             f"`hda eval-fit` on every fit, {entry['frames']} frames per split and motion: PSNR and SSIM inside the "
             "ground-truth mask's bounding box (+8 px), the person rather than the white background; full-frame "
             "PSNR beside it, which flatters a blurry avatar by several dB. *novel pose* is the held-out motion, "
             "seen by no fit.", "",
             "| split | subjects | views | box PSNR mean (dB) | median | 10th percentile | worst (subject) | "
             "box SSIM mean | full-frame PSNR mean (dB) |", "|---|---|---|---|---|---|---|---|---|"]
    for split, r in entry["splits"].items():
        lines.append(f"| {split} | {r['subjects']} | {r['views']} | {r['psnr_mean']:.2f} | {r['psnr_median']:.2f} | "
                     f"{r['psnr_p10']:.2f} | {r['psnr_worst']:.2f} ({r['worst']}) | {r['ssim_mean']:.3f} | "
                     f"{r['psnr_full_mean']:.2f} |")
    return lines + ["", f"The side by side of the subject lowest on the held-out motion (ground truth, render, "
                        f"error ×4) is `fit_eval/{FIT_EVAL_SHEET}` in the build's work folder.", ""]


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


@dataclass(frozen=True)
class GoalRow:
    goal: str
    measured: str
    real: str   # what real people score: the measured limit of the goal on this reference set ("—": none)
    met: bool


def goal_rows(report: dict, bundle: int) -> list[GoalRow]:
    """The model row "default" against GOALS, each beside what real people score; [] without a held-out
    split. Real people: training subjects drawn at random (eval-gen's copy baseline) against the held-out
    set, and, for the no-copies check, the held-out subjects against the training set: a generator that
    draws new people from the studio's own distribution scores about these."""
    if report["train"]["same_as_reference"]:
        return []
    rows = {r["name"]: r for r in report["rows"]}
    m, pca, blend, copy = rows["default"], rows.get("pca"), rows.get("blend"), rows.get("copy")
    real_side = report.get("held_out_vs_train")  # absent in reports written before it existed

    def real(text) -> str:
        return "—" if copy is None else text(copy)

    def copies(r: dict) -> str:
        return f"nearest {r['nearest_train_rms']:.4f} vs pair {r['closest_train_pair_rms']:.4f} RMS"

    low, high = GOALS["one_nna_band"]
    nna = [s["one_nna_psnr"] for s in m.get("seed_sets") or [m]]
    out = [GoalRow(f"colourfulness ratio ≥ {GOALS['colourfulness_ratio']}", f"{m['colourfulness_ratio']:.2f}",
                   real(lambda c: f"{c['colourfulness_ratio']:.2f}"),
                   m["colourfulness_ratio"] >= GOALS["colourfulness_ratio"]),
           GoalRow(f"sharpness ratio ≥ {GOALS['sharpness_ratio']}", f"{m['sharpness_ratio']:.2f}",
                   real(lambda c: f"{c['sharpness_ratio']:.2f}"), m["sharpness_ratio"] >= GOALS["sharpness_ratio"]),
           GoalRow(f"precision ≥ {_pct(GOALS['precision'])}", _pct(m["precision"]), real(lambda c: _pct(c["precision"])),
                   m["precision"] >= GOALS["precision"]),
           GoalRow(f"recall ≥ {_pct(GOALS['recall'])}", _pct(m["recall"]), real(lambda c: _pct(c["recall"])),
                   m["recall"] >= GOALS["recall"])]
    if pca and blend:
        out += [GoalRow("colour FD below the PCA and blend baselines'",
                        f"{m['colour_fd']:.0f} (PCA {pca['colour_fd']:.0f}, blend {blend['colour_fd']:.0f})",
                        real(lambda c: f"{c['colour_fd']:.0f}"),
                        m["colour_fd"] < min(pca["colour_fd"], blend["colour_fd"])),
                GoalRow("precision above the PCA and blend baselines'",
                        f"{_pct(m['precision'])} (PCA {_pct(pca['precision'])}, blend {_pct(blend['precision'])})",
                        real(lambda c: _pct(c["precision"])), m["precision"] > max(pca["precision"], blend["precision"]))]
    out += [GoalRow(f"COV ≥ {_pct(GOALS['cov_psnr'])}", _pct(m["cov_psnr"]), real(lambda c: _pct(c["cov_psnr"])),
                    m["cov_psnr"] >= GOALS["cov_psnr"]),
            GoalRow(f"1-NNA within {_pct(low)}–{_pct(high)} on each of {len(nna)} seed sets",
                    ", ".join(_pct(v) for v in nna), real(lambda c: _pct(c["one_nna_psnr"])),
                    all(low <= v <= high for v in nna)),
            GoalRow("no copies (no sample nearer a training subject than the closest training pair)", copies(m),
                    "—" if real_side is None else copies(real_side), bool(m["no_copies"])),
            GoalRow(f"≤ {GOALS['seconds_per_identity']:g} s to sample one identity", f"{m['seconds_per_identity']:.2f} s",
                    "—", m["seconds_per_identity"] <= GOALS["seconds_per_identity"]),
            GoalRow(f"model, references and sheets ≤ {BUNDLE_LIMIT / 2 ** 20:.0f} MiB", f"{bundle / 2 ** 20:.1f} MiB",
                    "—", bundle <= BUNDLE_LIMIT)]
    return out


def _goal_lines(paths: BuildPaths, report: dict) -> list[str]:
    rows = goal_rows(report, bundle_bytes(paths))
    if not rows:
        return []
    met = sum(r.met for r in rows)
    return ["## Against its goals", "",
            f"The default model against the held-out subjects: {met} of {len(rows)} met. \"Real people\" is what "
            "training subjects drawn at random (the copy baseline) score against the held-out set, and, for the "
            "no-copies check, what the held-out subjects score against the training set: the measured limit of "
            "each goal for a model that draws new people from the studio's own distribution.",
            "", "| goal | measured | real people | met |", "|---|---|---|---|",
            *[f"| {r.goal} | {r.measured} | {r.real} | {'yes' if r.met else '**no**'} |" for r in rows], ""]


def _trial_text(trial: dict) -> str:
    """One compact trial of the bundle record: '<group> in <precision>: worst X dB (needs Y)'. Records
    made before int8 existed have no 'precisions' and tried float16 only."""
    if "precisions" not in trial:
        return f"{'+'.join(trial['groups'])} in float16: worst {trial['worst_psnr_db']:.1f} dB"
    tried = ", ".join(f"{g} in {trial['precisions'][g]}" for g in trial["groups"])
    return f"{tried}: worst {trial['worst_psnr_db']:.1f} dB (needs {trial['min_psnr_db']:g})"


def _precision_line(model: dict, trials: str, refs: str) -> str:
    seeds = model["config"]["seeds"]

    judged = model.get("judged_seeds", seeds)  # records from before the plausibility filter judged every seed
    left_out = [s for s in seeds if s not in judged]
    judged_text = (f"; judged on the plausible ones, seeds {', '.join(map(str, judged))}: seed(s) "
                   f"{', '.join(map(str, left_out))} sampled an implausible avatar in float32, whose renders "
                   f"magnify any change" if left_out else "")

    def kept_if(threshold: str) -> str:
        return (f"{len(seeds)} samples (seeds {seeds[0]}..{seeds[-1]}{judged_text}) render within {threshold} of "
                f"the float32 model's in every gallery view")

    if "precisions" not in model:  # a record from before int8
        return (f"Half precision where it changes nothing measurable: each tensor group is kept in float16 only "
                f"if {kept_if(format(model['config']['min_psnr_db'], 'g') + ' dB PSNR')}. Measured: {trials}. "
                f"Kept in float16: {', '.join(model['half']) or 'nothing'}. References: {refs}.")
    kept = ", ".join(f"{g} in {p}" for g, p in model["precisions"].items()) or "everything in float32"
    return (f"Smaller precisions only where the renders keep: a tensor group is stored in int8 (the denoiser's "
            f"projections, {model['config']['int8_min_psnr_db']:g} dB) or float16 "
            f"({model['config']['min_psnr_db']:g} dB) only if {kept_if('the threshold')}. Measured: {trials}. "
            f"Kept: {kept}. References: {refs}.")


def model_card(paths: BuildPaths, build: DefaultBuildConfig, config: Config, state: dict) -> str:

    report = json.loads((paths.eval / "eval_gen.json").read_text())
    bundle = state["stages"]["bundle"]
    half = bundle["model"]
    trials = "; ".join(_trial_text(t) for t in half["trials"])
    refs = ", ".join(f"`{n}` ({'float16' if r['half'] else 'float32'}, worst {r['worst_psnr_db']:.1f} dB)"
                     for n, r in bundle["references"].items())
    found = [s for s in ("studio", "fits") if state["stages"].get(s, {}).get("found")]
    found_note = ([f"Stages {', '.join(found)} found work done by an earlier run of the same stage (same settings) "
                   "and only checked it; their own logs' compute is in the last column."] if found else [])
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    return "\n".join([
        "# HDA default model (model card)",
        "",
        f"Built by `hda build-default` (hda {__version__}), finished {state.get('finished', '?')}, on {machine}.",
        "Rebuild it with `hda build-default --out assets/default` (resumable; see README, *Default model*).",
        "",
        "## What it is",
        "",
        "A weight-space diffusion model over the UNets of Hyper Diffusion Avatars: every sample is a new "
        "person's avatar network, which poses, deforms and renders like a fitted one. It is what the Blender "
        "extension's *Sample Identity* button and `make demo` sample from when no other model is given. It is "
        "small and trained on few synthetic people: expect plausible, varied clothed bodies close to the "
        "training distribution, not photoreal identities.",
        "",
        "## Data",
        "",
        _data_line(build),
        "",
        "## Training",
        "",
        *_config_lines(build, config, state),
        "",
        *_fit_eval_lines(state),
        "## Files",
        "",
        *_files_table(paths),
        "",
        _precision_line(half, trials, refs),
        "",
        "## Evaluation (`hda eval-gen`, the diffusion issue's table)",
        "",
        *_eval_lines(build, report),
        "",
        *([f"Note: {n}" for n in report.get("notes", []) if n]),
        "",
        *_goal_lines(paths, report),
        "## Build time",
        "",
        *_time_lines(state),
        "",
        *found_note,
        "",
        "## Limitations",
        "",
        f"- {build.subjects} training subjects: the model covers the studio's variety (shape, skin, clothing colours and "
        "cuts), not the variety of real people.",
        "- Each subject was fitted on one training motion; extreme poses far from it deform less faithfully.",
        "- The denoiser is narrow (see Training) to fit the extension's download size; the paper's is far larger.",
        "",
        "## Licence",
        "",
        f"{LICENCE}. The model was trained only on renders of the bundled open body (CC0 1.0, from MakeHuman/MPFB2) "
        "with procedural clothing made by this project; no third-party data with other terms went into it.",
        "",
    ])
