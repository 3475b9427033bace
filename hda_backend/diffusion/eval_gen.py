"""`hda eval-gen`: unconditional-generation metrics of weight-space diffusion models (paper §5.1, Tables 1-2).

Rows: each diffusion model (sampled through :func:`hda_backend.diffusion.sample.sample_avatars`), each
folder of already generated avatars, and the baselines ``copy``, ``pca`` and ``blend`` fitted on the
training set. Columns: MMD, COV and 1-NNA with the PSNR distance of :mod:`.gallery` (and LPIPS where it
is available), FID/KID on Inception features (where local weights are given), the colour Fréchet
distance over per-part mean colours, the colourfulness and sharpness ratios, improved precision and
recall on per-part colour and texture statistics (:mod:`.image_stats`), novelty in weight and image
space, the fraction of plausible samples (:mod:`.plausibility`) and the sampling time per identity.
With a separate training set (``train``) the reference set is held out, and MMD/COV/1-NNA and
precision/recall are also computed against the training set (memorisation), with the no-copies check.
With ``seed_sets`` > 1 every diffusion row also draws that many independent seed sets (seeds seed + k·n,
k = 1 .., n each) and reports MMD/COV/1-NNA for each: with a few dozen samples one set's 1-NNA moves by
several points, so a claim about it needs more than one set.

Outputs in the output folder: ``eval_gen.md`` (table and protocol), ``eval_gen.json`` (every number,
per-sample plausibility and nearest references), ``samples_vs_nearest.png`` (each sample beside its
nearest reference subject, same pose and camera), ``<model>_vs_nearest_training.png`` (every sample of a
model row beside its nearest training subject: copies and blends show) and
``samples/<row>/sample_NNN.hda.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import write_text
from ..avatar.io import SUFFIX, load_avatar
from ..body import BodyModel
from ..constants import MAX_EVAL_SAMPLES
from ..errors import HDAError
from ..images import contact_sheet, save_png, to_uint8
from .baselines import BASELINES, baseline_samples
from .gallery import (Gallery, GalleryConfig, gallery_views, lpips_matrix, mse_matrix, psnr_distance,
                      render_avatar_parts, weight_distance_matrix)
from .gallery_cache import GalleryCache, render_files
from .image_stats import MEAN_COLOUR_COLUMNS, avatar_stats, standardise
from .metrics import KIDConfig, coverage, fid, kid, mmd, novelty, one_nna, precision_recall
from .plausibility import PlausibilityConfig, body_silhouettes, check_plausible
from .weights import WeightSet, load_weight_set, write_avatar

ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SAMPLE_PREFIX = "sample_"
SHEET_TILE = 128  # minimum tile size on samples_vs_nearest.png
TRAINING_SHEET_PAIRS = 4  # sample / nearest training subject pairs per row on <model>_vs_nearest_training.png


@dataclass(frozen=True)
class EvalGenConfig:
    n: int | None = None  # samples per generated row; None: as many as reference avatars
    seed: int = 0  # seeds every generated row (diffusion noise, baseline draws)
    steps: int | None = None  # DDIM steps for diffusion rows; None: the model's own default
    seed_sets: int = 1  # diffusion rows: MMD/COV/1-NNA on this many seed sets (seeds seed + k*n .. + n - 1)
    baselines: tuple = BASELINES
    contact_pairs: int = 6  # samples per row on samples_vs_nearest.png
    pr_k: int = 3  # k of the k-NN manifolds of precision/recall (Kynkäänniemi et al.'s default)
    gallery: GalleryConfig = field(default_factory=GalleryConfig)
    plausibility: PlausibilityConfig = field(default_factory=PlausibilityConfig)
    kid: KIDConfig = field(default_factory=KIDConfig)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Stats:
    """Per-avatar image statistics of a set (:mod:`.image_stats`): colourfulness [N], sharpness [N],
    part features [N,F]."""

    colourfulness: np.ndarray
    sharpness: np.ndarray
    features: np.ndarray


def _gallery_stats(gallery: Gallery, background) -> _Stats:
    per = [avatar_stats(gallery.images[i].numpy(), gallery.alpha[i].numpy(), gallery.labels[i].numpy(), background)
           for i in range(gallery.images.shape[0])]
    return _Stats(np.array([s.colourfulness for s in per]), np.array([s.sharpness for s in per]),
                  np.stack([s.features for s in per]))


@dataclass
class _Side:
    """A set of avatars with everything the metrics need: weights [N,D], gallery, names, image statistics."""

    weights: WeightSet
    gallery: Gallery
    names: list[str]
    stats: _Stats
    features: np.ndarray | None = None


PROTOCOL = """\
- **Reference set**: {reference_note}
- **Gallery**: every avatar rendered in {poses} from {cameras} cameras (azimuths {azimuths}°, around
  the posed body) at {size}×{size} px over background {background}, with the project's rasterizer
  ({views} views per avatar).
- **Distance**: D(X, Y) = −PSNR(X, Y), PSNR from the MSE pooled over all views, pixels and channels
  (MSE floored at 1e−10). MMD-PSNR is reported as a PSNR (mean over reference avatars of the best
  PSNR of any sample, higher = better){lpips_note}.
- **COV**: fraction of reference avatars that are the nearest reference of at least one sample.
- **1-NNA**: leave-one-out 1-NN classifier over samples ∪ references with D; an avatar's own
  zero distance is excluded, other exact duplicates count; ties score the fraction of tied
  neighbours from the same set. 50% = indistinguishable; ≪50% = samples sit on top of references
  (copies give 0%); 100% = separable. (The paper reads its 1-NNA of 15.7% as "lower is better"; by
  the standard definition used here 50% is ideal, so read it together with the novelty columns.)
- **FID / KID**: {fid_note}
- **Novelty**: each sample's distance to its nearest training avatar divided by the median
  nearest-neighbour distance among training avatars (median over samples; 0 = copies, ~1 = as new as
  a training subject is to the others), in weight space (L2 between weight vectors) and image space
  (RMS over the gallery). "copies" = fraction of samples nearer a training avatar than the closest
  pair of training avatars. In weight space, with few training avatars in hundreds of thousands of
  dimensions, a blend of several subjects (e.g. a `pca` sample) is also nearer each of them than they
  are to each other, so weight-space "copies" flags interpolations too; the image columns and the
  median ratio tell the two apart.
- **Colour FD**: the Fréchet distance between Gaussians fitted to the avatars' per-part mean colours
  (head, torso, arms, legs, feet: 15 values per avatar, 8-bit RGB; a pixel's part is that of the
  Gaussians that cover it most, from their texels' skinning weights), samples against references.
  Blends pull garment colours towards the average and shrink their spread: the distance grows.
- **Colourfulness ratio**: Hasler-Süsstrunk colourfulness over the person's pixels of each view (the
  background composited out), averaged over views and avatars, samples / references (1 ideal); the
  row's own value in brackets. **Sharpness ratio**: the variance of the 4-neighbour Laplacian of the
  luminance over the silhouette's interior (the person/background edge excluded), likewise (1 ideal).
- **Precision / recall**: improved precision and recall (Kynkäänniemi et al. 2019), k = {pr_k} nearest
  neighbours (fewer when a set is smaller), in the space of per-part colour and texture statistics (per
  part: mean colour, colour standard deviation, RMS Laplacian of the luminance; 35 values, each in units
  of the reference set's spread). Precision = samples inside the references' k-NN manifold (they look
  like people of the data), recall = references inside the samples' manifold (the data's variety is
  covered). This space needs no downloaded weights, and unlike PSNR a mean-like image is not close to
  everyone in it: a blend's averaged colours, lost prints and soft borders move it off the data.
- **Plausible**: fraction of samples passing all checks of `hda_backend/diffusion/plausibility.py`
  (finite weights and Gaussians, no exploded scales, centres inside the posed body's box + margin,
  silhouette coverage and area vs the body mesh's silhouette).
- **s / identity**: wall time to produce one sample avatar file (diffusion: DDIM sampling with
  {steps} steps, model loading included; baselines: drawing the vector and writing the file).
- **Samples per row**: {n} (seed {seed}: a diffusion row draws noise seeds {seed}..{seed}+{n}−1, so
  runs meant to be independent need seeds at least {n} apart); a `--samples` row uses all files of its
  folder. With a few dozen samples COV and 1-NNA move by several points between seeds.
"""


def parse_named(values: list[str] | None, flag: str) -> dict[str, Path]:
    """["NAME=PATH", ...] -> {NAME: PATH}; names are unique, short and file-system safe."""
    out: dict[str, Path] = {}
    for text in values or []:
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise HDAError(f"{flag} {text!r}: expected NAME=PATH")
        if not ROW_NAME.match(name):
            raise HDAError(f"{flag} {text!r}: row name {name!r}, expected letters, digits, '_', '-', '.' (max 64)")
        if name in out:
            raise HDAError(f"{flag} {text!r}: row name {name!r} given twice, expected unique names")
        out[name] = Path(path)
    return out


def _check_rows(models: dict, samples: dict, baselines: tuple) -> list[tuple[str, str, Path | None]]:
    rows = []
    for kind, named in (("model", models), ("samples", samples)):
        for name, path in named.items():
            if any(name == r[0] for r in rows) or name in baselines:
                raise HDAError(f"row name {name!r}: used twice (baselines are named {', '.join(BASELINES)}), "
                               "expected unique names")
            if kind == "model" and not path.is_file():
                raise HDAError(f"--model {name}={path}: diffusion model file not found")
            if kind == "samples" and not path.is_dir():
                raise HDAError(f"--samples {name}={path}: folder not found")
            rows.append((name, kind, path))
    for name in baselines:
        if name not in BASELINES:
            raise HDAError(f"baseline {name!r}: expected one of {', '.join(BASELINES)}")
        rows.append((name, "baseline", None))
    return rows


def _same_architecture(ref: WeightSet, other: WeightSet, source: str) -> None:
    for name in ("unet", "gaussians", "uv_res", "body_sha256", "pose_input"):
        mine, theirs = getattr(other.meta, name), getattr(ref.meta, name)
        if mine != theirs:
            raise HDAError(f"{source} {other.paths[0]}: field '{name}' is {mine!r}, expected {theirs!r} as in the "
                           "reference set (one architecture per evaluation)")


def _render_side(weights: WeightSet, body: BodyModel, views, backend: str, progress: bool, desc: str,
                 cache: GalleryCache | None) -> _Side:
    gallery = render_files(weights.paths, body, views, backend, parts=True, cache=cache, progress=progress, desc=desc)
    return _Side(weights, gallery, [p.name.removesuffix(SUFFIX) for p in weights.paths],
                 _gallery_stats(gallery, views.background.numpy()))


def _write_row(vectors: torch.Tensor, origins: list[str], ref: WeightSet, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{SAMPLE_PREFIX}*{SUFFIX}"):
        stale.unlink()
    return [write_avatar(vectors[i], ref.spec, ref.meta, folder / f"{SAMPLE_PREFIX}{i:03d}{SUFFIX}", origins[i])
            for i in range(vectors.shape[0])]


def _sample_model(path: Path, n: int, seed: int, steps: int | None, folder: Path, progress: bool,
                  device: str = "cpu") -> list[Path]:
    from .sample import sample_avatars

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{SAMPLE_PREFIX}*{SUFFIX}"):
        stale.unlink()
    return sample_avatars(path, seed=seed, n=n, steps=steps, out_dir=folder, progress=progress, device=device)


def _nearest(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d [G,R] distances -> (index [G] of each row's nearest column, its distance [G])."""
    index = d.argmin(axis=1)
    return index, d[np.arange(d.shape[0]), index]


@dataclass
class _Inputs:
    """What evaluate_generation checked and read before rendering anything."""

    rows: list  # (name, kind, source)
    ref: WeightSet
    train_set: WeightSet
    n: int
    given: dict  # --samples row name -> its WeightSet


def _check_inputs(reference, train, models: dict, samples: dict, config: EvalGenConfig) -> _Inputs:
    """Checking and reading: the rows, the reference and training sets, n, the --samples folders."""
    rows = _check_rows(models, samples, tuple(config.baselines))
    if not rows:
        raise HDAError("eval-gen: nothing to evaluate, expected --model, --samples or a baseline")
    ref = load_weight_set(reference)
    if ref.vectors.shape[0] < 2:
        raise HDAError(f"--reference {reference}: {ref.vectors.shape[0]} avatar, expected at least 2")
    train_set = ref if train is None else load_weight_set(train)
    if train is not None:
        _same_architecture(ref, train_set, "--train")
        if train_set.vectors.shape[0] < 2:
            raise HDAError(f"--train {train}: {train_set.vectors.shape[0]} avatar, expected at least 2")
    n = ref.vectors.shape[0] if config.n is None else config.n
    if not 1 <= n <= MAX_EVAL_SAMPLES:
        raise HDAError(f"--n {n}: expected 1..{MAX_EVAL_SAMPLES} samples per row")
    if config.steps is not None and config.steps < 1:
        raise HDAError(f"--steps {config.steps}: expected at least 1")
    if not 1 <= config.seed_sets <= MAX_EVAL_SAMPLES // n:
        raise HDAError(f"--seed-sets {config.seed_sets}: expected 1..{MAX_EVAL_SAMPLES // n} sets of {n} samples")
    given = {}  # --samples rows, read and checked before any rendering
    for name, kind, source in rows:
        if kind == "samples":
            given[name] = load_weight_set(source)
            if len(given[name].paths) > MAX_EVAL_SAMPLES:
                raise HDAError(f"--samples {name}={source}: {len(given[name].paths)} avatar files, expected at most "
                               f"{MAX_EVAL_SAMPLES}")
            _same_architecture(ref, given[name], f"--samples {name}:")
    return _Inputs(rows, ref, train_set, n, given)


def _row_avatars(name: str, kind: str, source, inputs: _Inputs, folder: Path, config: EvalGenConfig,
                 progress: bool) -> tuple[list[Path], float | None, WeightSet]:
    """The avatar files of one row (drawn, sampled or given): (files, seconds per identity, their weights)."""
    start = time.perf_counter()
    if kind == "baseline":
        vectors, origins = baseline_samples(name, inputs.train_set.vectors, inputs.n, config.seed)
        files = _write_row(vectors, origins, inputs.ref, folder)
    elif kind == "model":
        files = _sample_model(source, inputs.n, config.seed, config.steps, folder, progress, config.gallery.device)
    else:
        files = inputs.given[name].paths
    seconds = (time.perf_counter() - start) / len(files) if kind != "samples" else None
    gen = inputs.given[name] if kind == "samples" else load_weight_set(files)
    _same_architecture(inputs.ref, gen, f"row {name}:")
    return files, seconds, gen


def _render_row(gen: WeightSet, body: BodyModel, views, masks, config: EvalGenConfig, progress: bool,
                desc: str) -> tuple[Gallery, list]:
    """Every avatar of a row in the gallery views (with part labels), with its plausibility verdict."""
    backend = config.gallery.backend
    images, alphas, labels, verdicts = [], [], [], []
    for path in tqdm(gen.paths, desc=desc, unit="avatar", disable=not progress):
        avatar = load_avatar(path, body)
        rgb, alpha, label = render_avatar_parts(avatar, views, backend)
        verdicts.append(check_plausible(avatar, views, config.plausibility, alpha=alpha, body_masks=masks,
                                        backend=backend))
        images.append(rgb)
        alphas.append(alpha)
        labels.append(label)
    return Gallery(torch.stack(images), torch.stack(alphas), torch.stack(labels)), verdicts


@dataclass
class _Sets:
    """The reference and training sides and their within-set distances, computed once for all rows."""

    ref: _Side
    train: _Side
    mse_rr: torch.Tensor
    lpips_rr: np.ndarray | None
    mse_tt: torch.Tensor
    w_tt: np.ndarray
    separate_train: bool


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _appearance(stats: _Stats, against: _Stats, k: int) -> dict:
    """Colour Fréchet distance, colourfulness and sharpness (means and ratios), precision and recall of a
    row's statistics against a reference side's."""
    g, r = stats.features.shape[0], against.features.shape[0]
    out = {"colourfulness": float(stats.colourfulness.mean()),
           "colourfulness_ratio": _ratio(float(stats.colourfulness.mean()), float(against.colourfulness.mean())),
           "sharpness": float(stats.sharpness.mean()),
           "sharpness_ratio": _ratio(float(stats.sharpness.mean()), float(against.sharpness.mean())),
           "colour_fd": None, "precision": None, "recall": None, "pr_k": min(k, g - 1, r - 1)}
    if g >= 2 and r >= 2:  # a Gaussian needs two points, a k-NN radius one other point
        # max(0, ·): equal sets give a rounding error of either sign around the true 0.
        out["colour_fd"] = max(0.0, fid(255.0 * stats.features[:, MEAN_COLOUR_COLUMNS],
                                        255.0 * against.features[:, MEAN_COLOUR_COLUMNS]))
        out["precision"], out["recall"] = precision_recall(standardise(against.features, against.features),
                                                           standardise(stats.features, against.features),
                                                           out["pr_k"])
    return out


def _against_train(mse_gt: torch.Tensor, d_gg: torch.Tensor, stats: _Stats, sets: _Sets, pr_k: int) -> dict:
    """MMD/COV/1-NNA and precision/recall of a set of avatars (distances mse_gt [G,T] to the training
    gallery, d_gg [G,G] among themselves) against the training set: memorisation."""
    d_gt, d_tt = psnr_distance(mse_gt), psnr_distance(sets.mse_tt)
    appearance = _appearance(stats, sets.train.stats, pr_k)
    return {"mmd_psnr_db": -mmd(d_gt), "cov_psnr": coverage(d_gt), "one_nna_psnr": one_nna(d_gg, d_gt, d_tt),
            **{key: appearance[key] for key in ("precision", "recall", "pr_k")}}


def _copies(mse_gt: torch.Tensor, nov_i) -> dict:
    """The no-copies check: no avatar nearer (RMS over the gallery) a training subject than the closest
    training pair is to each other."""
    nearest_train = float(np.sqrt(mse_gt).min())
    return {"nearest_train_rms": nearest_train, "closest_train_pair_rms": nov_i.train_nn_min,
            "no_copies": bool(nearest_train >= nov_i.train_nn_min)}


def _held_out_vs_train(sets: _Sets, pr_k: int) -> dict:
    """The held-out subjects themselves scored like a row against the training set: what new real people
    from the studio's distribution get on the memorisation table and the no-copies check, the scale a
    model's row is read on (with 96 similar studio subjects a real new person can fail the check)."""
    mse_rt = mse_matrix(sets.ref.gallery.images, sets.train.gallery.images)
    nov_i = novelty(np.sqrt(mse_rt), np.sqrt(sets.mse_tt))
    return {"vs_train": _against_train(mse_rt, psnr_distance(sets.mse_rr), sets.ref.stats, sets, pr_k),
            "novelty_image": nov_i.summary(), **_copies(mse_rt, nov_i)}


def _row_metrics(gallery: Gallery, gen: WeightSet, verdicts: list, files: list[Path], sets: _Sets, config,
                 lpips: Callable | None, inception: Callable | None) -> tuple[dict, list, tuple, tuple]:
    """The maths of one row: MMD, COV, 1-NNA (PSNR, LPIPS), FID/KID, colour, sharpness, precision/recall,
    novelty, plausibility, and the same against the training set when it is separate; returns (the row's
    metric fields, per-sample details, (each sample's nearest reference, its distance), (its nearest training
    subject, its distance))."""
    ref = sets.ref
    stats = _gallery_stats(gallery, config.gallery.background)
    mse_gr = mse_matrix(gallery.images, ref.gallery.images)
    mse_gg = mse_matrix(gallery.images, gallery.images)
    d_gr, d_gg, d_rr = psnr_distance(mse_gr), psnr_distance(mse_gg), psnr_distance(sets.mse_rr)
    row = {"mmd_psnr_db": -mmd(d_gr), "cov_psnr": coverage(d_gr), "one_nna_psnr": one_nna(d_gg, d_gr, d_rr)}
    if lpips is not None:
        l_gr = lpips_matrix(gallery.images, ref.gallery.images, lpips)
        l_gg = lpips_matrix(gallery.images, gallery.images, lpips)
        row.update(mmd_lpips=mmd(l_gr), cov_lpips=coverage(l_gr), one_nna_lpips=one_nna(l_gg, l_gr, sets.lpips_rr))
    if inception is not None:
        feats = inception(gallery.images.flatten(0, 1).numpy())
        kid_mean, kid_std = kid(feats, ref.features, config.kid)
        row.update(fid=fid(feats, ref.features), kid=kid_mean, kid_std=kid_std)
    mse_gt = mse_matrix(gallery.images, sets.train.gallery.images) if sets.separate_train else mse_gr
    nov_w = novelty(weight_distance_matrix(gen.vectors, sets.train.weights.vectors), sets.w_tt)
    nov_i = novelty(np.sqrt(mse_gt), np.sqrt(sets.mse_tt))
    row.update(_appearance(stats, ref.stats, config.pr_k))
    if sets.separate_train:
        row["vs_train"] = _against_train(mse_gt, d_gg, stats, sets, config.pr_k)
    nearest, nearest_d = _nearest(d_gr)
    nearest_t, nearest_t_d = _nearest(psnr_distance(mse_gt))
    row.update(novelty_weight=nov_w.summary(), novelty_image=nov_i.summary(), **_copies(mse_gt, nov_i),
               plausible_fraction=float(np.mean([v.ok for v in verdicts])))
    details = [{"file": str(files[i]), "plausible": verdicts[i].to_dict(),
                "nearest_reference": ref.names[int(nearest[i])], "nearest_psnr_db": float(-nearest_d[i]),
                "nearest_training": sets.train.names[int(nearest_t[i])],
                "nearest_training_psnr_db": float(-nearest_t_d[i]),
                "novelty_weight_ratio": float(nov_w.ratios[i]), "novelty_image_ratio": float(nov_i.ratios[i]),
                "colourfulness": float(stats.colourfulness[i]), "sharpness": float(stats.sharpness[i])}
               for i in range(len(files))]
    return row, details, (nearest, nearest_d), (nearest_t, nearest_t_d)


def _zoomed(tiles: list, config: EvalGenConfig) -> list:
    """Small galleries are enlarged (nearest neighbour) so that the labels fit above each tile."""
    zoom = -(-SHEET_TILE // config.gallery.size)
    return [np.repeat(np.repeat(to_uint8(t), zoom, axis=0), zoom, axis=1) for t in tiles]


def _fidelity(gallery: Gallery, sets: _Sets) -> dict:
    """MMD, COV and 1-NNA (PSNR distance) of a row's gallery against the reference set."""
    d_gr = psnr_distance(mse_matrix(gallery.images, sets.ref.gallery.images))
    d_gg = psnr_distance(mse_matrix(gallery.images, gallery.images))
    return {"mmd_psnr_db": -mmd(d_gr), "cov_psnr": coverage(d_gr),
            "one_nna_psnr": one_nna(d_gg, d_gr, psnr_distance(sets.mse_rr))}


def _seed_sets(name: str, source: Path, row: dict, inputs: _Inputs, body: BodyModel, views, sets: _Sets,
               out_dir: Path, config: EvalGenConfig, progress: bool) -> list[dict]:
    """A diffusion row's MMD/COV/1-NNA on ``config.seed_sets`` sets of n seeds: the row's own (seeds
    seed..seed+n-1), then seed + k*n .. for k = 1.., each sampled into samples/<row>.seeds<first>/."""
    out = [{"seed": config.seed, **{k: row[k] for k in ("mmd_psnr_db", "cov_psnr", "one_nna_psnr")}}]
    for k in range(1, config.seed_sets):
        seed = config.seed + k * inputs.n
        files = _sample_model(source, inputs.n, seed, config.steps, out_dir / "samples" / f"{name}.seeds{seed}",
                              progress, config.gallery.device)
        gallery = render_files(files, body, views, config.gallery.backend, progress=progress,
                               desc=f"{name} seeds {seed}")
        out.append({"seed": seed, **_fidelity(gallery, sets)})
    return out


def _write_report(out_dir: Path, report: dict, sheet_tiles: list, sheet_labels: list, config: EvalGenConfig) -> None:
    """eval_gen.json, eval_gen.md and samples_vs_nearest.png (the first samples of every row beside their
    nearest reference subject)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "eval_gen.json", json.dumps(report, indent=2))
    write_text(out_dir / "eval_gen.md", format_report(report))
    columns = 2 * min(config.contact_pairs, max(len(r["files"]) for r in report["rows"]))
    sheet = contact_sheet(_zoomed(sheet_tiles, config), columns=max(columns, 2), labels=sheet_labels)
    save_png(out_dir / "samples_vs_nearest.png", np.asarray(sheet))


def evaluate_generation(reference: str | os.PathLike, out_dir: str | os.PathLike, body: BodyModel,
                        models: dict[str, Path] | None = None, samples: dict[str, Path] | None = None,
                        train: str | os.PathLike | None = None, config: EvalGenConfig = EvalGenConfig(),
                        lpips: Callable | None = None, inception: Callable | None = None,
                        notes: tuple[str, ...] = (), progress: bool = True,
                        gallery_cache: str | os.PathLike | None = None) -> dict:
    """Evaluate every row against the reference avatars; write the report files; return the JSON dict.

    reference / train: folders (or files) of ``*.hda.safetensors``; ``train`` (what the models and the
    baselines were fitted on, the novelty reference) defaults to the reference set. models: row name ->
    diffusion model file; samples: row name -> folder of generated avatar files. lpips(x [V,3,H,W],
    y [V,3,H,W]) -> mean LPIPS; inception(images [N,H,W,3]) -> features [N,F] (see
    :func:`.gallery.load_inception`); either may be None (that column is left out). notes: one-line
    notes (e.g. why LPIPS is off) copied into the report. gallery_cache: a folder where the reference
    and training sets' galleries are kept between runs (:mod:`.gallery_cache`; the numbers are the same
    with or without it).
    """
    out_dir = Path(out_dir)
    inputs = _check_inputs(reference, train, models or {}, samples or {}, config)
    ref, train_set = inputs.ref, inputs.train_set

    views = gallery_views(body, config.gallery)
    backend = config.gallery.backend
    masks = body_silhouettes(body, views)
    cache = GalleryCache(gallery_cache) if gallery_cache is not None else None
    ref_side = _render_side(ref, body, views, backend, progress, "reference", cache)
    train_side = ref_side if train is None else _render_side(train_set, body, views, backend, progress, "train", cache)
    if inception is not None:
        ref_side.features = inception(ref_side.gallery.images.flatten(0, 1).numpy())
    mse_rr = mse_matrix(ref_side.gallery.images, ref_side.gallery.images)
    sets = _Sets(ref_side, train_side, mse_rr,
                 lpips_matrix(ref_side.gallery.images, ref_side.gallery.images, lpips) if lpips else None,
                 mse_rr if train is None else mse_matrix(train_side.gallery.images, train_side.gallery.images),
                 weight_distance_matrix(train_set.vectors, train_set.vectors), train is not None)

    results, sheet_tiles, sheet_labels = [], [], []
    for name, kind, source in inputs.rows:
        files, seconds, gen = _row_avatars(name, kind, source, inputs, out_dir / "samples" / name, config, progress)
        gallery, verdicts = _render_row(gen, body, views, masks, config, progress, name)
        metrics, details, (nearest, nearest_d), (nearest_t, nearest_t_d) = _row_metrics(
            gallery, gen, verdicts, files, sets, config, lpips, inception)
        if kind == "model" and config.seed_sets > 1:
            metrics["seed_sets"] = _seed_sets(name, source, metrics, inputs, body, views, sets, out_dir, config,
                                              progress)
        results.append({"name": name, "kind": kind, "source": None if source is None else str(source),
                        "count": len(files), "files": [str(p) for p in files], **metrics,
                        "seconds_per_identity": seconds, "samples": details})
        for i in range(min(config.contact_pairs, len(files))):
            sheet_tiles += [gallery.images[i, 0], ref_side.gallery.images[int(nearest[i]), 0]]
            sheet_labels += [f"{name} {i}" + ("" if verdicts[i].ok else " (!)"),
                             f"{ref_side.names[int(nearest[i])][:12]} {-nearest_d[i]:.1f}dB"]
        if kind == "model":  # every sample of a model beside its nearest training subject
            tiles = [t for i in range(len(files)) for t in (gallery.images[i, 0], train_side.gallery.images[int(nearest_t[i]), 0])]
            labels = [t for i in range(len(files)) for t in (
                f"{name} {i}", f"{train_side.names[int(nearest_t[i])][:12]} {-nearest_t_d[i]:.1f}dB")]
            save_png(out_dir / f"{name}_vs_nearest_training.png",
                     np.asarray(contact_sheet(_zoomed(tiles, config), columns=2 * TRAINING_SHEET_PAIRS, labels=labels)))
        del gallery

    report = {
        "format": "hda-eval-gen", "format_version": 1,
        "reference": {"source": str(reference), "count": ref.vectors.shape[0], "files": [str(p) for p in ref.paths]},
        "train": {"source": str(train if train is not None else reference), "count": train_set.vectors.shape[0],
                  "same_as_reference": train is None},
        "reference_stats": {"colourfulness": float(ref_side.stats.colourfulness.mean()),
                            "sharpness": float(ref_side.stats.sharpness.mean())},
        "train_stats": {"colourfulness": float(train_side.stats.colourfulness.mean()),
                        "sharpness": float(train_side.stats.sharpness.mean())},
        "n": inputs.n, "config": config.to_dict(), "notes": list(notes),
        "columns": {"lpips": lpips is not None, "fid_kid": inception is not None},
        "rows": results,
        "held_out_vs_train": _held_out_vs_train(sets, config.pr_k) if train is not None else None,
        "gallery_cache": None if cache is None else {"folder": str(cache.folder), "hits": cache.hits,
                                                     "misses": cache.misses},
    }
    _write_report(out_dir, report, sheet_tiles, sheet_labels, config)
    return report


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def format_table(report: dict) -> str:
    """The markdown table of a report: one line per row."""
    lp, fk = report["columns"]["lpips"], report["columns"]["fid_kid"]
    head = ["row", "MMD-PSNR ↑ (dB)", "COV-PSNR ↑ (%)", "1-NNA-PSNR (%, 50 ideal)"]
    if lp:
        head += ["MMD-LPIPS ↓", "COV-LPIPS (%)", "1-NNA-LPIPS (%)"]
    if fk:
        head += ["FID ↓", "KID×1000 ↓"]
    head += ["colour FD ↓", "colourfulness ratio (value)", "sharpness ratio", "precision ↑ (%)", "recall ↑ (%)",
             "novelty w (median / copies %)", "novelty img (median / copies %)", "plausible (%)", "s / identity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [f"{r['name']} ({r['kind']}, {r['count']})", f"{r['mmd_psnr_db']:.2f}", _pct(r["cov_psnr"]),
                 _pct(r["one_nna_psnr"])]
        if lp:
            cells += [f"{r['mmd_lpips']:.2f}", _pct(r["cov_lpips"]), _pct(r["one_nna_lpips"])]
        if fk:
            cells += [f"{r['fid']:.2f}", f"{1000 * r['kid']:.2f}"]
        # .get: a report written before these columns existed (a resumed build's eval) shows "—".
        cells += [_num(r.get("colour_fd"), 1),
                  f"{_num(r.get('colourfulness_ratio'))} ({_num(r.get('colourfulness'), 1)})",
                  _num(r.get("sharpness_ratio")), _pct(r.get("precision")), _pct(r.get("recall"))]
        for key in ("novelty_weight", "novelty_image"):
            cells.append(f"{r[key]['median_ratio']:.3f} / {_pct(r[key]['copy_fraction'])}")
        cells.append(_pct(r["plausible_fraction"]))
        cells.append("—" if r["seconds_per_identity"] is None else f"{r['seconds_per_identity']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_train_table(report: dict) -> str:
    """With a held-out reference set: each row against the training set (memorisation), one line per row."""
    head = ["row", "MMD-PSNR vs train (dB)", "COV vs train (%)", "1-NNA vs train (%)", "precision vs train (%)",
            "recall vs train (%)", "nearest train RMS (min)", "closest train pair RMS", "no copies"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    real = report.get("held_out_vs_train")  # absent in reports written before it existed
    named = [(f"{r['name']} ({r['kind']}, {r['count']})", r) for r in report["rows"]]
    if real is not None:
        named.append((f"held-out subjects (real people, {report['reference']['count']})", real))
    for name, r in named:
        t = r["vs_train"]
        lines.append("| " + " | ".join([
            name, f"{t['mmd_psnr_db']:.2f}", _pct(t["cov_psnr"]),
            _pct(t["one_nna_psnr"]), _pct(t["precision"]), _pct(t["recall"]), f"{r['nearest_train_rms']:.4f}",
            f"{r['closest_train_pair_rms']:.4f}", "yes" if r["no_copies"] else "**no**"]) + " |")
    return "\n".join(lines)


def format_seed_sets_table(report: dict) -> str:
    """The diffusion rows' MMD/COV/1-NNA on each seed set ("" when no row has more than one set)."""
    lines = []
    for r in report["rows"]:
        for s in r.get("seed_sets", []):
            lines.append(f"| {r['name']} | {s['seed']}..{s['seed'] + r['count'] - 1} | {s['mmd_psnr_db']:.2f} | "
                         f"{_pct(s['cov_psnr'])} | {_pct(s['one_nna_psnr'])} |")
    if not lines:
        return ""
    return "\n".join(["| row | seeds | MMD-PSNR ↑ (dB) | COV-PSNR ↑ (%) | 1-NNA-PSNR (%, 50 ideal) |",
                      "|---|---|---|---|---|", *lines])


def format_report(report: dict) -> str:
    """eval_gen.md: the table, the notes and the protocol."""
    cfg = report["config"]
    g = cfg["gallery"]
    ref, train = report["reference"], report["train"]
    if train["same_as_reference"]:
        reference_note = (f"the training set itself ({ref['count']} avatars from `{ref['source']}`). With a few "
                          "dozen subjects a held-out split would leave too few references for MMD/COV to mean "
                          "much, and the models are trained on every subject; so fidelity (MMD, COV) is measured "
                          "against the training avatars and memorisation is exposed by 1-NNA (copies → 0%), the "
                          "novelty columns and the `copy` baseline.")
    else:
        reference_note = (f"{ref['count']} held-out avatars from `{ref['source']}`; models and baselines were "
                          f"fitted on {train['count']} training avatars from `{train['source']}` (the novelty "
                          "reference). The second table repeats MMD/COV/1-NNA and precision/recall against the "
                          "training avatars (memorisation: copies give 100 dB, 0% 1-NNA) with the no-copies check: "
                          "no sample nearer (RMS over the gallery) a training subject than the closest pair of "
                          "training subjects is to each other. Its last line scores the held-out subjects "
                          "themselves the same way: what new real people get, the scale the rows are read on.")
    lpips_note = ("; LPIPS columns: D = 1000 × mean LPIPS-AlexNet over views, same definitions"
                  if report["columns"]["lpips"] else "")
    fid_note = ("Inception-V3 pool features of every gallery image of a row against every reference gallery "
                f"image; KID: unbiased polynomial-kernel MMD² (degree {cfg['kid']['degree']}), mean over "
                f"{cfg['kid']['subsets']} subsets of min({cfg['kid']['subset_size']}, #images) images, ×1000 in "
                "the table. With a few hundred images FID is biased upwards: compare rows, not papers."
                if report["columns"]["fid_kid"] else "not computed (no local Inception weights).")
    protocol = PROTOCOL.format(
        reference_note=reference_note, poses=", ".join(g["poses"]), cameras=len(g["azimuths_deg"]),
        azimuths=", ".join(f"{a:g}" for a in g["azimuths_deg"]), size=g["size"],
        background=tuple(g["background"]), views=len(g["poses"]) * len(g["azimuths_deg"]), lpips_note=lpips_note,
        fid_note=fid_note, steps=cfg["steps"] if cfg["steps"] is not None else "the model's default",
        n=report["n"], seed=cfg["seed"], pr_k=cfg["pr_k"])
    parts = ["# Unconditional generation (hda eval-gen)", "", format_table(report), "",
             f"Reference set: colourfulness {report['reference_stats']['colourfulness']:.1f}, sharpness "
             f"{report['reference_stats']['sharpness']:.3g} (means over its avatars; the ratios divide a row's "
             "by these).",
             ""]
    if not train["same_as_reference"]:
        parts += ["## Against the training set (memorisation)", "", format_train_table(report), ""]
    if format_seed_sets_table(report):
        parts += ["## Seed sets (the reference set as above)", "", format_seed_sets_table(report), ""]
    if report["notes"]:
        parts += ["Notes:", ""] + [f"- {note}" for note in report["notes"]] + [""]
    parts += ["## Protocol", "", protocol,
              "`samples_vs_nearest.png`: each sample (front camera, first pose) beside its nearest reference "
              "avatar by PSNR; '(!)' marks a sample that failed a plausibility check.", ""]
    return "\n".join(parts)
