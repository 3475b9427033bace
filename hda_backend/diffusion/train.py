"""``hda train-diffusion``: train the weight-space denoiser on a folder of fitted avatars (paper §4.2-4.3).

x0-prediction (``diffusion.prediction``: or eps, v) with an MSE loss on normalised weight vectors; AdamW;
lr × ``lr_decay`` every ``lr_decay_every`` epochs (an epoch is ceil(N / batch) steps); an exponential moving
average (EMA) of the weights, with the usual warm-up min(decay, (1+step)/(10+step)) so short runs are not
dominated by the initialisation.

Each step draws the *global* batch (avatar indices, timesteps, noise) from one seeded generator that every
rank holds identically; rank r trains on rows [r·B/W, (r+1)·B/W) and DistributedDataParallel averages the
gradients, so a torchrun run follows the single-process run with the same global batch.

Files beside ``--out DIFF.safetensors``:

- ``DIFF.ckpt.safetensors`` every ``checkpoint_every`` steps (atomic): model, EMA, AdamW state, step, the
  data generator's and torch's RNG states, normaliser, configs, layer spec, avatar metadata and a
  fingerprint of the training data; ``--resume`` continues exactly;
- ``DIFF.loss.jsonl``: one line per ``log_every`` steps (step, epoch, lr, loss, seconds);
- ``DIFF.curve.png``: the loss curve;
- ``DIFF.safetensors`` at the end: the EMA weights, normaliser, layer spec, avatar metadata and configs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import checkpoint
from ..avatar.io import SUFFIX as AVATAR_SUFFIX
from ..config import DiffusionConfig
from ..devices import rank_device, resolve_device
from ..errors import HDAError
from ..images import line_plot
from ..outputs import CHECKPOINT, beside, output_stem
from ..steplog import append_step_log, read_step_log, write_step_log
from ..steps import run_steps
from .model_io import SUFFIX, denoiser_config, save_model, schedule_config
from .schedule import add_noise, alphas_cumprod, prediction_target
from .transformer import WeightDenoiser
from .weights import Normalizer, WeightSet, load_weight_set

CHECKPOINT_FORMAT = "hda-diffusion-checkpoint"


@dataclass(frozen=True)
class DiffusionPaths:
    model: Path
    checkpoint: Path
    log: Path
    curve: Path

    @classmethod
    def for_output(cls, out: str | os.PathLike) -> "DiffusionPaths":
        """The files of ``--out DIFF.safetensors``, named by :mod:`hda_backend.outputs`' rule."""
        stem = output_stem(out, SUFFIX, {AVATAR_SUFFIX: "an avatar"})
        return cls(Path(out), beside(stem, CHECKPOINT), beside(stem, "loss.jsonl"), beside(stem, "curve.png"))


@dataclass
class TrainResult:
    paths: DiffusionPaths
    steps: int
    seconds: float
    final_loss: float
    parameters: int
    norm_scale: float  # the global factor of the normalisation (diffusion.norm_scale, or the automatic one)


def steps_per_epoch(num_avatars: int, batch: int) -> int:
    return math.ceil(num_avatars / batch)


def learning_rate(d: DiffusionConfig, step: int, per_epoch: int) -> float:
    """The step-decay schedule as a pure function of the step (so resuming needs only the step)."""
    return d.lr * d.lr_decay ** ((step // per_epoch) // d.lr_decay_every)


def draw_batch(generator: torch.Generator, z: torch.Tensor, batch: int, timesteps: int):
    """The global batch of one step: (x0 [B, D], noise [B, D], t [B]); avatars without replacement if N >= B."""
    n = z.shape[0]
    if n >= batch:
        index = torch.randperm(n, generator=generator)[:batch]
    else:
        index = torch.randint(n, (batch,), generator=generator)
    t = torch.randint(timesteps, (batch,), generator=generator)
    noise = torch.randn(batch, z.shape[1], generator=generator)
    return z[index], noise, t


def terminal_scale(z: torch.Tensor, abar_last: float) -> float:
    """z: [N, D] standardised set -> the factor s <= 1 with ᾱ_{T-1}·s²·λ_max = 1.

    λ_max is the set's largest variance along one direction. Standardised per coordinate, N avatars in D
    dimensions put about D/(N-1) there, and ᾱ_{T-1}·λ_max >> 1: noised data at t = T-1 would still be far
    from the N(0, I) that sampling starts from, and samples would stay near the mean. Scaling by s makes
    the noise drown even that direction at t = T-1.
    """
    centred = z - z.mean(0)
    lam = torch.linalg.eigvalsh((centred @ centred.T).to(torch.float64))[-1].item() / len(z)  # via the N x N Gram
    return min(1.0, (abar_last * lam) ** -0.5) if lam > 0 else 1.0


def _fingerprint(d: DiffusionConfig, data: WeightSet, total: int) -> str:
    digest = hashlib.sha256(data.vectors.contiguous().numpy()).hexdigest()
    return json.dumps({"diffusion": dataclasses.asdict(d), "data_sha256": digest, "num_avatars": len(data.paths),
                       "steps": total}, sort_keys=True)


def _init_distributed(requested: str, log: Callable[[str], None]) -> tuple[int, int, torch.device]:
    """(rank, world, this rank's device) for ``--device`` ``requested`` (see ``devices.rank_device``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(requested, log)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = torch.device(rank_device(requested, int(os.environ.get("LOCAL_RANK", "0")), local_world,
                                      torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before nccl, or every rank uses GPU 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # Ranks on one machine share its cores: each takes its part instead of oversubscribing.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return dist.get_rank(), dist.get_world_size(), device


def save_checkpoint(path: Path, model: torch.nn.Module, ema: dict, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, normalizer: Normalizer, data: WeightSet, d: DiffusionConfig,
                    step: int, seconds: float, fingerprint: str) -> None:
    """:func:`checkpoint.save` with the EMA (restored on resume), torch's RNGs (dropout) and, for reading
    only, the normaliser and what the model file will carry."""
    metadata = {"diffusion": json.dumps(dataclasses.asdict(d), sort_keys=True), "layer_spec": data.spec.to_json(),
                "avatar_meta": data.meta.to_json(), "normalization": normalizer.mode,
                "norm_scale": f"{normalizer.scale:.9g}"}
    checkpoint.save(path, model.state_dict(), optimizer, generator, step, seconds, fingerprint, CHECKPOINT_FORMAT,
                    groups={"ema": ema}, tensors=normalizer.to_tensors(), metadata=metadata, global_rng=True)


def load_checkpoint(path: Path, model: torch.nn.Module, ema: dict, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, fingerprint: str) -> tuple[int, float]:
    return checkpoint.load(path, model, optimizer, generator, fingerprint, CHECKPOINT_FORMAT, groups={"ema": ema},
                           global_rng=True, started_with="diffusion config, avatars or steps")


def train_diffusion(fits, out, d: DiffusionConfig, resume: bool = False, steps: int | None = None,
                    progress: bool = True, log: Callable[[str], None] = print,
                    stop_after: int | None = None, device: str | torch.device | None = "auto") -> TrainResult:
    """Train on the avatars in ``fits`` (folder or paths) and write ``out``; see the module docstring.

    ``steps`` overrides ``epochs`` (total optimiser steps); ``stop_after`` ends the run early after a
    checkpoint, as an interruption would. ``device``: auto | cpu | cuda[:N]; under torchrun each rank
    takes the GPU of its LOCAL_RANK.
    """
    paths = DiffusionPaths.for_output(out)
    data = load_weight_set(fits)
    rank, world, device = _init_distributed(str(device or "auto"), log)
    try:
        return _train(data, paths, d, resume, steps, progress and rank == 0, log, stop_after, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """What one training run holds: the data, the model, its EMA and optimiser, the RNG, the log."""

    d: DiffusionConfig
    data: WeightSet
    paths: DiffusionPaths
    normalizer: Normalizer
    z: torch.Tensor  # the normalised training set [N, D]
    abar: torch.Tensor
    model: WeightDenoiser
    net: torch.nn.Module  # the model, wrapped in DDP under torchrun (after a resume has loaded it)
    ema: dict
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    fingerprint: str
    total: int
    per_epoch: int
    device: torch.device
    rank: int
    world: int
    history: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # trained before this process, from the checkpoint
    clock: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.clock

    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else math.nan


def _setup(data: WeightSet, paths: DiffusionPaths, d: DiffusionConfig, total: int, per_epoch: int,
           rank: int, world: int, device: torch.device) -> _Run:
    normalizer = Normalizer.fit(data.vectors, data.spec, d.normalization, d.norm_eps)
    abar = alphas_cumprod(schedule_config(d))
    scale = d.norm_scale or terminal_scale(normalizer.encode(data.vectors), abar[-1].item())
    normalizer = Normalizer.fit(data.vectors, data.spec, d.normalization, d.norm_eps, scale)
    torch.manual_seed(d.seed)  # model initialisation (and dropout): identical on every rank
    z = normalizer.encode(data.vectors)
    model = WeightDenoiser(data.spec, denoiser_config(d))
    if d.projections == "principal":
        model.tokenizer.set_principal_projections(z)
    model = model.to(device)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # The fused AdamW kernel is several times faster on the large per-layer projections.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=d.lr,
                                  weight_decay=d.weight_decay, fused=True)
    return _Run(d, data, paths, normalizer, z, abar, model, model, ema, optimizer,
                torch.Generator().manual_seed(d.seed), _fingerprint(d, data, total), total, per_epoch, device,
                rank, world)


def _step(run: _Run, step: int, lr: float, ema_live: list, live: list) -> float:
    """One optimiser step on the global batch of ``step`` (this rank's rows), then the EMA; the mean loss."""
    d = run.d
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    rows = slice(run.rank * d.batch // run.world, (run.rank + 1) * d.batch // run.world)
    x0, noise, t = draw_batch(run.generator, run.z, d.batch, d.timesteps)
    x0, noise, t = x0[rows].to(run.device), noise[rows].to(run.device), t[rows].to(run.device)
    target = prediction_target(x0, noise, t, run.abar, d.prediction)
    loss = torch.nn.functional.mse_loss(run.net(add_noise(x0, noise, t, run.abar), t), target)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    done = step + 1
    with torch.no_grad():
        decay = min(d.ema_decay, done / (done + 9))
        torch._foreach_lerp_(ema_live, live, 1.0 - decay)
        value = loss.detach()
        if run.world > 1:
            dist.all_reduce(value)
            value /= run.world
    value = float(value)
    if not math.isfinite(value):
        raise HDAError(f"train-diffusion: loss became {value} at step {step}; lower diffusion.lr "
                       f"(now {d.lr}) and --resume from the last checkpoint {run.paths.checkpoint}")
    return value


def _log(run: _Run, done: int, lr: float, loss: float) -> dict:
    row = {"step": done, "epoch": round(done / run.per_epoch, 3), "lr": lr, "loss": loss,
           "seconds": round(run.elapsed(), 3)}
    run.history.append(row)
    if run.rank == 0:
        append_step_log(run.paths.log, row)
    return row


def _checkpoint(run: _Run, done: int) -> None:
    if run.rank == 0:
        save_checkpoint(run.paths.checkpoint, run.model, run.ema, run.optimizer, run.generator, run.normalizer,
                        run.data, run.d, done, run.elapsed(), run.fingerprint)
    if run.world > 1:
        dist.barrier()


def _finish(run: _Run) -> None:
    """The model file and the loss curve (rank 0)."""
    if run.rank == 0:
        d, history = run.d, run.history
        save_model(run.paths.model, {k: v.cpu() for k, v in run.ema.items()}, run.normalizer, run.data, d,
                   run.total, run.final_loss())
        line_plot([(f"diffusion loss ({d.prediction} MSE, {d.tokenizer} tokens)", [r["step"] for r in history],
                    [r["loss"] for r in history])], log_y=(True,)).save(run.paths.curve)
    if run.world > 1:
        dist.barrier()


def _train(data: WeightSet, paths: DiffusionPaths, d: DiffusionConfig, resume, steps, progress, log, stop_after,
           rank: int, world: int, device: torch.device) -> TrainResult:
    if d.batch % world:
        raise HDAError(f"diffusion.batch {d.batch}: expected a multiple of the number of ranks ({world})")
    per_epoch = steps_per_epoch(len(data.paths), d.batch)
    total = steps or d.epochs * per_epoch
    if paths.checkpoint.exists() and not resume:
        raise HDAError(f"checkpoint {paths.checkpoint} exists: pass --resume to continue it, "
                       "or delete it to start over")
    run = _setup(data, paths, d, total, per_epoch, rank, world, device)
    parameters = sum(p.numel() for p in run.model.parameters())
    start = 0
    if resume and paths.checkpoint.exists():
        start, run.seconds = load_checkpoint(paths.checkpoint, run.model, run.ema, run.optimizer, run.generator,
                                             run.fingerprint)
        log(f"resuming diffusion training at step {start}/{total}")
    run.history = read_step_log(paths.log, start)
    if rank == 0:
        write_step_log(paths.log, run.history)
    if world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(run.model)
    params = dict(run.model.named_parameters())
    ema_live = [run.ema[k] for k in params]  # the state dict holds parameters only (buffers are not persistent)
    live = [p.detach() for p in params.values()]
    run.clock = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=f"train-diffusion ({d.tokenizer})", unit="step", disable=not progress)
    run.model.train()

    def step(index: int) -> dict:
        return {"loss": _step(run, index, learning_rate(d, index, per_epoch), ema_live, live)}

    def on_log(done: int, means: dict) -> None:
        lr = learning_rate(d, done - 1, per_epoch)
        row = _log(run, done, lr, means["loss"])
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")

    done = run_steps(start, total, step, d.log_every, d.checkpoint_every, on_log, lambda n: _checkpoint(run, n),
                     stop_after, bar)
    if done < total:
        bar.close()
        return TrainResult(paths, done, run.elapsed(), run.final_loss(), parameters, run.normalizer.scale)
    bar.close()
    seconds = run.elapsed()
    _finish(run)
    return TrainResult(paths, total, seconds, run.final_loss(), parameters, run.normalizer.scale)
