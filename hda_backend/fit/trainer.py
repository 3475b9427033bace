"""``hda fit``: optimise one avatar UNet on one subject's multi-view video (paper §4.1, Eq. 9).

Each step renders one random (training camera, training frame) view, cropped around the person's mask,
over the subject's known background colour, and takes one AdamW step on L1 + SSIM + LPIPS + mask L1.

Nothing is lost: every ``fit.checkpoint_every`` steps the UNet, the optimiser state, the step and the
view sampler's RNG state are written atomically to ``<out>.ckpt.safetensors``; ``--resume`` continues
the exact schedule from there. Beside the avatar file go ``<out>.metrics.jsonl`` (one line per
``fit.log_every`` steps), ``<out>.curve.png`` (loss and PSNR) and ``<out>.views.png`` (ground truth,
render and error for held-out views).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .. import checkpoint
from ..atomic import atomic_save_safetensors
from ..avatar.io import SUFFIX, load_avatar, save_avatar
from ..avatar.model import Avatar
from ..body import load_body
from ..config import Config
from ..dataset import Subject, load_subject
from ..devices import resolve_device
from ..errors import HDAError
from ..images import contact_sheet, error_heat, line_plot, to_uint8
from ..outputs import CHECKPOINT, beside, output_stem
from ..precision import resolve as resolve_precision
from ..render.frames import render_gaussians
from ..render.warmup import load_from_cache
from ..steplog import append_step_log, read_step_log, write_step_log
from ..steps import run_steps
from .appearance import fit_maps, initial_map, regress_unet, views_by_frame
from .losses import load_lpips, photometric_loss, psnr

CHECKPOINT_FORMAT = "hda-fit-checkpoint"
MAP_FORMAT = "hda-fit-map"


@dataclass(frozen=True)
class FitPaths:
    avatar: Path
    checkpoint: Path
    metrics: Path
    curve: Path
    views: Path
    map: Path  # the appearance stage's fitted per-texel map (fit/appearance.py), for diagnosis

    @classmethod
    def for_output(cls, out: str | os.PathLike) -> "FitPaths":
        stem = output_stem(out, SUFFIX)
        return cls(Path(out), beside(stem, CHECKPOINT), beside(stem, "metrics.jsonl"), beside(stem, "curve.png"),
                   beside(stem, "views.png"), beside(stem, "map.safetensors"))


@dataclass
class FitResult:
    avatar: Avatar
    steps: int
    seconds: float
    final_psnr: float
    paths: FitPaths


def mask_bounds(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), the bounding box of mask [H,W] > 0.5 (x1, y1 exclusive); None if it is empty."""
    rows = torch.nonzero(mask.amax(1) > 0.5)
    cols = torch.nonzero(mask.amax(0) > 0.5)
    if rows.numel() == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_box(mask: torch.Tensor, margin: float, minimum: int = 16) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around mask > 0.5, grown by ``margin`` of its size; the whole image if empty."""
    height, width = mask.shape
    bounds = mask_bounds(mask)
    if bounds is None:
        return 0, 0, width, height
    x0, y0, x1, y1 = bounds
    grow_y = max(int(margin * (y1 - y0)), (minimum - (y1 - y0) + 1) // 2, 0)
    grow_x = max(int(margin * (x1 - x0)), (minimum - (x1 - x0) + 1) // 2, 0)
    return max(0, x0 - grow_x), max(0, y0 - grow_y), min(width, x1 + grow_x), min(height, y1 + grow_y)


def render_view(avatar: Avatar, subject: Subject, cam: int, frame: int, box=None, backend: str = "auto",
                sh_degree: int | None = None, pose_jitter: torch.Tensor | None = None):
    """Render the avatar as camera ``cam`` sees frame ``frame``: (rgb [h,w,3], alpha [h,w]) for the crop box.

    ``sh_degree``: the SH bands to evaluate (default: the avatar's ``gaussians.sh_degree``).
    ``pose_jitter``: [55,3] added to the pose the UNet sees (not to the pose it is skinned into)."""
    pose = subject.poses[frame:frame + 1]
    seen = None if pose_jitter is None else pose + pose_jitter
    g = avatar(pose, subject.transl[frame:frame + 1], input_pose=seen).index(0)
    degree = avatar.gaussian_config.sh_degree if sh_degree is None else sh_degree
    return render_posed(g, subject, cam, box, backend, degree)


def render_posed(g, subject: Subject, cam: int, box=None, backend: str = "auto", sh_degree: int = 3):
    """Render Gaussians already posed for a frame as camera ``cam`` sees them: (rgb [h,w,3], alpha [h,w])."""
    x0, y0, x1, y1 = box or (0, 0, subject.width, subject.height)
    K = subject.Ks[cam].clone()
    K[0, 2] -= x0
    K[1, 2] -= y0
    rgb, alpha = render_gaussians(g, subject.viewmats[cam], K, x1 - x0, y1 - y0,
                                  background=subject.background, backend=backend, sh_degree=sh_degree)
    return rgb, alpha[..., 0]


def cached_kernels(device: torch.device, backend: str, log: Callable[[str], None]) -> None:
    """A fit on the CPU rasterizer runs numba's cached kernels, never ones its own process compiled, so
    that its result does not depend on whether the cache was warm (``render.warmup.load_from_cache``)."""
    if device.type == "cpu" and backend in ("auto", "cpu"):
        load_from_cache(log)


class _Views:
    """Images and masks of a subject, decoded once and kept while they fit in memory."""

    def __init__(self, subject: Subject, budget_bytes: int = 2 << 30):
        self.subject = subject
        self.cache: dict = {}
        self.keep = subject.width * subject.height * 16 * subject.num_cameras * subject.num_frames <= budget_bytes

    def __call__(self, cam: int, frame: int):
        key = (cam, frame)
        if key in self.cache:
            return self.cache[key]
        value = (self.subject.image(cam, frame), self.subject.mask(cam, frame))
        if self.keep:
            self.cache[key] = value
        return value


def _fingerprint(config: Config, subject: Subject, init_from, static: bool, total: int) -> str:
    data = {"fit": dataclasses.asdict(config.fit), "unet": config.unet.to_dict(), "uv": config.uv.res,
            "gaussians": config.gaussians.to_dict(), "subject": subject.name,
            "init_from": str(init_from) if init_from else None, "static": static, "steps": total}
    return json.dumps(data, sort_keys=True)


def initial_avatar(config: Config, body, init_from=None, static: bool = False) -> Avatar:
    """The consistently initialised avatar, or a copy of ``init_from``'s weights (same architecture only)."""
    if init_from is None:
        return Avatar.from_init(body, config.uv.res, config.unet, config.gaussians, config.fit.seed, static)
    source = load_avatar(init_from, body)
    if source.unet.config != config.unet:
        raise HDAError(f"--init-from {init_from}: field 'unet' is {source.unet.config.to_dict()}, expected "
                       f"{config.unet.to_dict()} (the preset's architecture)")
    if source.uv_res != config.uv.res:
        raise HDAError(f"--init-from {init_from}: field 'uv_res' is {source.uv_res}, expected {config.uv.res}")
    avatar = Avatar(body, config.uv.res, config.unet, config.gaussians, static)
    avatar.unet.load_state_dict(source.unet.state_dict())
    return avatar


def fit_subject(subject_dir, out, config: Config, init_from=None, resume: bool = False, static: bool = False,
                steps: int | None = None, backend: str | None = None, progress: bool = True,
                log: Callable[[str], None] = print, stop_after: int | None = None,
                device: str | torch.device | None = "auto") -> FitResult:
    """Fit one subject; see the module docstring for the files written. ``stop_after`` ends the run
    early (after a checkpoint), as an interruption would. ``device``: auto | cpu | cuda[:N] (see
    ``hda_backend.devices``); the avatar and the subject's cameras, poses and images go there."""
    subject = load_subject(subject_dir)
    if not subject.train_frames or not subject.train_cameras:
        raise HDAError(f"{subject.root}/subject.json: no training frames or cameras, expected at least one of each")
    paths = FitPaths.for_output(out)
    body = load_body(config.body.path, config.body.num_betas)
    fit = config.fit
    total = steps or (fit.init_steps if init_from else fit.steps)
    if paths.checkpoint.exists() and not resume:
        raise HDAError(f"checkpoint {paths.checkpoint} exists: pass --resume to continue it, or delete it to start over")
    avatar = initial_avatar(config, body, init_from, static)
    device = resolve_device(device, log)  # once the inputs are known to be good
    if device.type == "cpu" and torch.cuda.is_available():
        log(f"fit: training on the CPU although CUDA is available ({config.preset} preset); "
            "pass --device auto or cuda to train on the GPU")
    subject, avatar = subject.to(device), avatar.to(device)
    precision = avatar.precision = resolve_precision(fit.precision, device)
    optimizer = torch.optim.AdamW(avatar.unet.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
    generator = torch.Generator().manual_seed(fit.seed)
    fingerprint = _fingerprint(config, subject, init_from, static, total)
    start, seconds = 0, 0.0
    resuming = resume and paths.checkpoint.exists()
    if resuming:
        start, seconds = checkpoint.load(paths.checkpoint, avatar.unet, optimizer, generator, fingerprint,
                                         CHECKPOINT_FORMAT, started_with="config, subject or --init-from")
        log(f"resuming {subject.name} at step {start}/{total}")
    paths.avatar.parent.mkdir(parents=True, exist_ok=True)
    history = read_step_log(paths.metrics, start) if resuming else []
    write_step_log(paths.metrics, history)
    perceptual, status = load_lpips(fit.lpips_alexnet) if fit.lambda_lpips > 0 else (None, "LPIPS off: weight 0")
    if perceptual is None:
        log(status)
    views = [(c, f) for c in subject.train_cameras for f in subject.train_frames]
    data = _Views(subject)
    backend = backend or config.render.backend
    cached_kernels(device, backend, log)
    view_loss = view_scorer(subject, data, fit, backend, perceptual)
    clock = time.perf_counter()

    if not resuming and (fit.init_map_steps if init_from else fit.map_steps) > 0:
        appearance_stage(avatar, subject, config, init_from, views, data, view_loss, generator, history, paths,
                         progress, log)
        seconds = time.perf_counter() - clock
        checkpoint.save(paths.checkpoint, avatar.unet.state_dict(), optimizer, generator, 0, seconds, fingerprint,
                        CHECKPOINT_FORMAT)
        clock = time.perf_counter()
    log(f"fit {subject.name}: UNet in {precision} on {device}, {fit.cameras_per_step} camera(s) per step")
    by_frame = views_by_frame(views)
    frames = sorted(by_frame)
    bar = tqdm(total=total, initial=start, desc=f"fit {subject.name}", unit="step", disable=not progress)

    def step(index: int) -> dict:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(fit, index, total)
        frame = frames[int(torch.randint(len(frames), (1,), generator=generator))]
        cams = by_frame[frame]
        picks = torch.randperm(len(cams), generator=generator)[:fit.cameras_per_step].tolist()
        jitter = None
        if fit.pose_jitter > 0 and not static:
            # Drawn from the CPU generator (its state is checkpointed for exact resume), then moved.
            jitter = (torch.randn(55, 3, generator=generator) * fit.pose_jitter).to(device)
        pose = subject.poses[frame:frame + 1]
        g = avatar(pose, subject.transl[frame:frame + 1], input_pose=None if jitter is None else pose + jitter).index(0)
        loss, terms = 0.0, {}
        for i in picks:
            one, parts = view_loss(g, cams[i], frame, sh_degree(fit, config, index))
            loss = loss + one / len(picks)
            for key, value in parts.items():
                terms[key] = terms.get(key, 0.0) + value.detach() / len(picks)
        if not torch.isfinite(loss):
            raise HDAError(f"fit {subject.name}: loss became {loss.item()} at step {index}; lower fit.lr "
                           f"(now {fit.lr}) and --resume from the last checkpoint {paths.checkpoint}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {key: float(value) for key, value in terms.items()} | {"loss": float(loss.detach())}

    def on_log(done: int, means: dict) -> None:
        row = {"step": done, "lr": learning_rate(fit, done - 1, total), **means,
               "seconds": round(seconds + time.perf_counter() - clock, 3)}
        history.append(row)
        append_step_log(paths.metrics, row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr']:.2f}")

    def on_checkpoint(done: int) -> None:
        checkpoint.save(paths.checkpoint, avatar.unet.state_dict(), optimizer, generator, done,
                        seconds + time.perf_counter() - clock, fingerprint, CHECKPOINT_FORMAT)

    done = run_steps(start, total, step, fit.log_every, fit.checkpoint_every, on_log, on_checkpoint, stop_after, bar)
    if done < total:
        bar.close()
        return FitResult(avatar, done, seconds + time.perf_counter() - clock, _last_psnr(history), paths)
    bar.close()
    seconds += time.perf_counter() - clock
    _finish(avatar, subject, paths, history, init_from, backend)
    return FitResult(avatar, total, seconds, _last_psnr(history), paths)


def _finish(avatar: Avatar, subject: Subject, paths: FitPaths, history: list, init_from, backend: str) -> None:
    """The avatar file, the curve of the end-to-end steps and the held-out side-by-side."""
    origin = f"fit:{subject.name}" + (f" init:{Path(init_from).name}" if init_from else "")
    save_avatar(avatar, paths.avatar, origin=origin)
    rows = [r for r in history if "stage" not in r]
    line_plot([("loss (L1 + SSIM + mask)", [r["step"] for r in rows], [r["loss"] for r in rows]),
               ("training-view PSNR (dB)", [r["step"] for r in rows], [r["psnr"] for r in rows])],
              log_y=(True, False)).save(paths.curve)
    side_by_side(avatar, subject, backend).save(paths.views)


def view_scorer(subject: Subject, data: "_Views", fit, backend: str, perceptual=None) -> Callable:
    """view_loss(gaussians, cam, frame, sh_degree) -> (loss, terms): one training view rendered over the
    crop around its mask and scored by the paper's Eq. 9 (terms include its PSNR)."""
    weights = {"l1": fit.lambda_l1, "ssim": fit.lambda_ssim, "lpips": fit.lambda_lpips, "mask": fit.lambda_mask}

    def view_loss(g, cam: int, frame: int, degree: int):
        image, mask = data(cam, frame)
        x0, y0, x1, y1 = box = crop_box(mask, fit.crop_margin)
        rgb, alpha = render_posed(g, subject, cam, box, backend, degree)
        gt = image[y0:y1, x0:x1]
        loss, terms = photometric_loss(rgb, alpha, gt, mask[y0:y1, x0:x1], weights, perceptual)
        with torch.no_grad():
            terms["psnr"] = psnr(rgb, gt)
        return loss, terms

    return view_loss


def fitted_map(avatar: Avatar, subject: Subject, config: Config, init_from, views: list, data, view_loss,
               generator: torch.Generator, progress: bool = False, log: Callable[[str], None] = print,
               on_row: Callable[[dict], None] = lambda row: None) -> torch.Tensor:
    """Stage 1 of the recipe: the raw map [M,59] initialised by projection and fitted by rendering the
    training views; ``on_row`` receives its log rows (``stage`` "maps", step 0)."""
    fit = config.fit
    clock = time.perf_counter()

    def camera(cam):
        return subject.viewmats[cam], subject.Ks[cam], subject.width, subject.height

    def pose(frame):
        return subject.poses[frame:frame + 1], subject.transl[frame:frame + 1]

    spread = subject.train_frames[:: max(1, len(subject.train_frames) // 8)]
    projected = [(c, f) for c in subject.train_cameras for f in spread]
    raw = initial_map(avatar, subject.betas, projected, camera, pose, data)
    log(f"fit {subject.name}: colours projected from {len(projected)} views in {time.perf_counter() - clock:.1f} s")
    map_steps = fit.init_map_steps if init_from else fit.map_steps
    bar = tqdm(total=map_steps, desc=f"maps {subject.name}", unit="step", disable=not progress)
    degree = config.gaussians.sh_degree

    def log_map(step, means):
        on_row({"stage": "maps", "stage_step": step, "step": 0, **means,
                "seconds": round(time.perf_counter() - clock, 3)})
        bar.update(step - bar.n)
        bar.set_postfix(psnr=f"{means['psnr']:.2f}")

    raw = fit_maps(avatar, raw, views, pose, lambda g, c, f: view_loss(g, c, f, degree), map_steps,
                   generator=generator, cameras_per_step=fit.cameras_per_step, log_every=fit.log_every,
                   on_log=log_map)
    bar.close()
    return raw


def fit_map_only(subject_dir, config: Config, init_from=None, progress: bool = False,
                 log: Callable[[str], None] = print, device: str | torch.device | None = "auto"
                 ) -> tuple[Avatar, torch.Tensor]:
    """(avatar, raw map) of stage 1 alone, exactly as :func:`fit_subject` fits it (same views, seed and
    steps), without the UNet: the ceiling of the template-bound map for ``scripts/fidelity.py``."""
    device = resolve_device(device, log)
    subject = load_subject(subject_dir).to(device)
    fit = config.fit
    avatar = initial_avatar(config, load_body(config.body.path, config.body.num_betas), init_from).to(device)
    views = [(c, f) for c in subject.train_cameras for f in subject.train_frames]
    data = _Views(subject)
    cached_kernels(device, config.render.backend, log)
    view_loss = view_scorer(subject, data, fit, config.render.backend)
    generator = torch.Generator().manual_seed(fit.seed)
    return avatar, fitted_map(avatar, subject, config, init_from, views, data, view_loss, generator, progress, log)


def appearance_stage(avatar: Avatar, subject: Subject, config: Config, init_from, views: list, data, view_loss,
                     generator: torch.Generator, history: list, paths: FitPaths, progress: bool,
                     log: Callable[[str], None]) -> None:
    """Stages 1 and 2 of the recipe (``fit/appearance.py``): the projected and fitted raw map, then the
    UNet regressed onto it. Their log rows go to the step log with ``stage`` set and step 0."""
    fit = config.fit
    clock = time.perf_counter()

    def on_row(row):
        history.append(row)
        append_step_log(paths.metrics, row)

    raw = fitted_map(avatar, subject, config, init_from, views, data, view_loss, generator, progress, log, on_row)
    atomic_save_safetensors({"raw": raw.contiguous()}, paths.map, {"format": MAP_FORMAT, "subject": subject.name})
    regress = fit.init_regress_steps if init_from else fit.regress_steps
    # The UNet's inputs: the training poses' maps, or the rest pose's alone for a static avatar.
    poses = subject.poses.new_zeros(1, 55, 3) if avatar.static else subject.poses[subject.train_frames]
    maps = torch.cat([avatar.pose_inputs(poses[i:i + 16])[0] for i in range(0, len(poses), 16)])
    bar = tqdm(total=regress, desc=f"regress {subject.name}", unit="step", disable=not progress)

    def log_regress(step, means):
        on_row({"stage": "regress", "stage_step": step, "step": 0, **means,
                "seconds": round(time.perf_counter() - clock, 3)})
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{means['regression']:.4f}")

    regress_unet(avatar, raw, maps, regress, fit.regress_lr, generator=generator, log_every=fit.log_every,
                 on_log=log_regress)
    bar.close()
    log(f"fit {subject.name}: appearance stage (maps {fit.init_map_steps if init_from else fit.map_steps}, "
        f"regression {regress} steps) "
        f"in {time.perf_counter() - clock:.1f} s")


def learning_rate(fit, step: int, total: int) -> float:
    """Linear warm-up over ``fit.warmup_steps``, then cosine decay to ``fit.lr * fit.lr_final`` at ``total``."""
    if step < fit.warmup_steps:
        return fit.lr * (step + 1) / fit.warmup_steps
    progress = (step - fit.warmup_steps) / max(1, total - fit.warmup_steps)
    return fit.lr * (fit.lr_final + (1.0 - fit.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sh_degree(fit, config: Config, step: int) -> int:
    """SH bands rendered at ``step``: 3DGS's warm-up, one band more every ``fit.sh_degree_every`` steps."""
    if fit.sh_degree_every == 0:
        return config.gaussians.sh_degree
    return min(config.gaussians.sh_degree, step // fit.sh_degree_every)


def _last_psnr(history: list[dict]) -> float:
    return history[-1]["psnr"] if history else float("nan")


@torch.no_grad()
def side_by_side(avatar: Avatar, subject: Subject, backend: str = "auto", count: int = 4):
    """Rows of ground truth | render | 4x absolute error for held-out views (held-out cameras on the
    training motion, then the held-out motion)."""
    cams = subject.test_cameras or subject.train_cameras
    picks = [(cams[i % len(cams)], subject.train_frames[(i * 7) % len(subject.train_frames)])
             for i in range(count // 2)]
    if subject.test_frames:
        picks += [(c, subject.test_frames[(i * 3) % len(subject.test_frames)]) for i, c in enumerate(
            (cams + subject.train_cameras)[: count - len(picks)])]
    tiles, labels = [], []
    for cam, frame in picks:
        rgb, _ = render_view(avatar, subject, cam, frame, backend=backend)
        gt = subject.image(cam, frame)
        heat = error_heat(rgb, gt)
        split = "novel pose" if frame in subject.test_frames else "novel view"
        tiles += [to_uint8(gt), to_uint8(rgb), to_uint8(heat)]
        labels += [f"{split} cam {subject.camera_names[cam]} f{subject.frame_names[frame]}: ground truth",
                   f"render {psnr(rgb, gt):.1f} dB", "error x4"]
    return contact_sheet(tiles, columns=3, labels=labels)
