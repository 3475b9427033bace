"""``hda train-diffusion``: train the weight-space denoiser on a folder of fitted avatars (paper §4.2-4.3).

x0-prediction with an MSE loss on normalised weight vectors; AdamW; lr × ``lr_decay`` every
``lr_decay_every`` epochs (an epoch is ceil(N / batch) steps); an exponential moving average (EMA) of the
weights, with the usual warm-up min(decay, (1+step)/(10+step)) so short runs are not dominated by the
initialisation.

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
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..avatar.io import atomic_save_safetensors
from ..config import DiffusionConfig
from ..errors import HDAError
from ..images import line_plot
from ..steplog import read_step_log, write_step_log
from .schedule import ScheduleConfig, add_noise, alphas_cumprod
from .transformer import DenoiserConfig, WeightDenoiser
from .weights import Normalizer, WeightSet, load_weight_set

MODEL_FORMAT = "hda-diffusion"
MODEL_FORMAT_VERSION = "1"
CHECKPOINT_FORMAT = "hda-diffusion-checkpoint"
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class DiffusionPaths:
    model: Path
    checkpoint: Path
    log: Path
    curve: Path

    @classmethod
    def for_output(cls, out: str | os.PathLike) -> "DiffusionPaths":
        out = Path(out)
        if not out.name.endswith(SUFFIX) or out.name.endswith(".hda.safetensors") or out.name == SUFFIX:
            raise HDAError(f"--out {out}: expected a file name ending in {SUFFIX} (and not .hda.safetensors, "
                           "which is an avatar)")
        stem = out.parent / out.name[: -len(SUFFIX)]
        return cls(out, Path(f"{stem}.ckpt{SUFFIX}"), Path(f"{stem}.loss.jsonl"), Path(f"{stem}.curve.png"))


@dataclass
class TrainResult:
    paths: DiffusionPaths
    steps: int
    seconds: float
    final_loss: float
    parameters: int
    norm_scale: float  # the global factor of the normalisation (diffusion.norm_scale, or the automatic one)


def denoiser_config(d: DiffusionConfig) -> DenoiserConfig:
    return DenoiserConfig(tokenizer=d.tokenizer, chunk_size=d.chunk_size, width=d.width, blocks=d.blocks,
                          heads=d.heads, ffn=d.ffn, dropout=d.dropout)


def schedule_config(d: DiffusionConfig) -> ScheduleConfig:
    return ScheduleConfig(timesteps=d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end)


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


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before nccl, or every rank uses GPU 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    # Ranks on one machine share its cores: each takes its part instead of oversubscribing.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return dist.get_rank(), dist.get_world_size()


def _device(world: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)
    return torch.device("cpu")


def read_tensors(path: Path, what: str) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {}), {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise HDAError(f"{what} {path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def save_checkpoint(path: Path, model: torch.nn.Module, ema: dict, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, normalizer: Normalizer, data: WeightSet, d: DiffusionConfig,
                    step: int, seconds: float, fingerprint: str) -> None:
    state = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.data"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():  # dropout on the GPU draws from the device's generator
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors.update(normalizer.to_tensors())
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(step), "seconds": f"{seconds:.3f}",
                "param_groups": json.dumps(state["param_groups"]), "fingerprint": fingerprint,
                "diffusion": json.dumps(dataclasses.asdict(d), sort_keys=True), "layer_spec": data.spec.to_json(),
                "avatar_meta": data.meta.to_json(), "normalization": normalizer.mode,
                "norm_scale": f"{normalizer.scale:.9g}"}
    atomic_save_safetensors(tensors, path, metadata)


def load_checkpoint(path: Path, model: torch.nn.Module, ema: dict, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, fingerprint: str) -> tuple[int, float]:
    metadata, tensors = read_tensors(path, "checkpoint")
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise HDAError(f"checkpoint {path}: field 'format' is {metadata.get('format')!r}, "
                       f"expected '{CHECKPOINT_FORMAT}'")
    if metadata.get("fingerprint") != fingerprint:
        raise HDAError(f"checkpoint {path}: field 'fingerprint' differs from this run's diffusion config, avatars or "
                       "steps; resume with the same arguments, or delete the checkpoint to start over")
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for key in ema:
            ema[key].copy_(tensors[f"ema.{key}"])
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
        generator.set_state(tensors["rng.data"])
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available() and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        return int(metadata["step"]), float(metadata["seconds"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise HDAError(f"checkpoint {path}: does not fit this model ({str(exc).splitlines()[0]}); "
                       "delete it to start over") from None


def save_model(path: Path, ema: dict, normalizer: Normalizer, data: WeightSet, d: DiffusionConfig,
               steps: int, final_loss: float) -> None:
    """The trained model: EMA weights (``model.*``) + normaliser + metadata (JSON) for sampling."""
    tensors = {f"model.{k}": v for k, v in ema.items()}
    tensors.update(normalizer.to_tensors())
    metadata = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
                "diffusion": json.dumps(dataclasses.asdict(d), sort_keys=True), "layer_spec": data.spec.to_json(),
                "avatar_meta": data.meta.to_json(), "normalization": normalizer.mode,
                "norm_scale": f"{normalizer.scale:.9g}", "steps": str(steps),
                "num_avatars": str(len(data.paths)), "final_loss": f"{final_loss:.6g}",
                "sources": json.dumps([p.name for p in data.paths])}
    atomic_save_safetensors(tensors, path, metadata)


def train_diffusion(fits, out, d: DiffusionConfig, resume: bool = False, steps: int | None = None,
                    progress: bool = True, log: Callable[[str], None] = print,
                    stop_after: int | None = None) -> TrainResult:
    """Train on the avatars in ``fits`` (folder or paths) and write ``out``; see the module docstring.

    ``steps`` overrides ``epochs`` (total optimiser steps); ``stop_after`` ends the run early after a
    checkpoint, as an interruption would.
    """
    paths = DiffusionPaths.for_output(out)
    data = load_weight_set(fits)
    rank, world = _init_distributed()
    try:
        return _train(data, paths, d, resume, steps, progress and rank == 0, log, stop_after, rank, world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(data: WeightSet, paths: DiffusionPaths, d: DiffusionConfig, resume, steps, progress, log, stop_after,
           rank: int, world: int) -> TrainResult:
    if d.batch % world:
        raise HDAError(f"diffusion.batch {d.batch}: expected a multiple of the number of ranks ({world})")
    per_epoch = steps_per_epoch(len(data.paths), d.batch)
    total = steps or d.epochs * per_epoch
    if paths.checkpoint.exists() and not resume:
        raise HDAError(f"checkpoint {paths.checkpoint} exists: pass --resume to continue it, "
                       "or delete it to start over")
    device = _device(world)
    normalizer = Normalizer.fit(data.vectors, data.spec, d.normalization, d.norm_eps)
    abar = alphas_cumprod(schedule_config(d))
    scale = d.norm_scale or terminal_scale(normalizer.encode(data.vectors), abar[-1].item())
    normalizer = Normalizer.fit(data.vectors, data.spec, d.normalization, d.norm_eps, scale)
    z = normalizer.encode(data.vectors)
    torch.manual_seed(d.seed)  # model initialisation (and dropout): identical on every rank
    model = WeightDenoiser(data.spec, denoiser_config(d)).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # The fused AdamW kernel is several times faster on the large per-layer projections.
    optimizer = torch.optim.AdamW(model.parameters(), lr=d.lr, weight_decay=d.weight_decay, fused=True)
    generator = torch.Generator().manual_seed(d.seed)
    fingerprint = _fingerprint(d, data, total)
    start, seconds = 0, 0.0
    if resume and paths.checkpoint.exists():
        start, seconds = load_checkpoint(paths.checkpoint, model, ema, optimizer, generator, fingerprint)
        log(f"resuming diffusion training at step {start}/{total}")
    history = read_step_log(paths.log, start)
    if rank == 0:
        write_step_log(paths.log, history)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    rows = slice(rank * d.batch // world, (rank + 1) * d.batch // world)
    params = dict(model.named_parameters())
    ema_live = [ema[k] for k in params]  # the state dict holds parameters only (buffers are not persistent)
    live = [p.detach() for p in params.values()]
    running: list[float] = []
    clock = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=f"train-diffusion ({d.tokenizer})", unit="step", disable=not progress)
    model.train()
    for step in range(start, total):
        lr = learning_rate(d, step, per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, noise, t = draw_batch(generator, z, d.batch, d.timesteps)
        x0, noise, t = x0[rows].to(device), noise[rows].to(device), t[rows].to(device)
        x_t = add_noise(x0, noise, t, abar)
        loss = torch.nn.functional.mse_loss(net(x_t, t), x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        with torch.no_grad():
            decay = min(d.ema_decay, done / (done + 9))
            torch._foreach_lerp_(ema_live, live, 1.0 - decay)
            value = loss.detach()
            if world > 1:
                dist.all_reduce(value)
                value /= world
        if not math.isfinite(float(value)):
            raise HDAError(f"train-diffusion: loss became {float(value)} at step {step}; lower diffusion.lr "
                           f"(now {d.lr}) and --resume from the last checkpoint {paths.checkpoint}")
        running.append(float(value))
        bar.update(1)
        if done % d.log_every == 0 or done == total:
            row = {"step": done, "epoch": round(done / per_epoch, 3), "lr": lr, "loss": sum(running) / len(running),
                   "seconds": round(seconds + time.perf_counter() - clock, 3)}
            running = []
            history.append(row)
            if rank == 0:
                with paths.log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
        if done % d.checkpoint_every == 0 or done == total:
            if rank == 0:
                save_checkpoint(paths.checkpoint, model, ema, optimizer, generator, normalizer, data, d, done,
                                seconds + time.perf_counter() - clock, fingerprint)
            if world > 1:
                dist.barrier()
            if stop_after is not None and stop_after <= done < total:
                bar.close()
                return TrainResult(paths, done, seconds + time.perf_counter() - clock,
                                   history[-1]["loss"] if history else math.nan, parameters, scale)
    bar.close()
    seconds += time.perf_counter() - clock
    final_loss = history[-1]["loss"] if history else math.nan
    if rank == 0:
        save_model(paths.model, {k: v.cpu() for k, v in ema.items()}, normalizer, data, d, total, final_loss)
        line_plot([(f"diffusion loss (x0 MSE, {d.tokenizer} tokens)", [r["step"] for r in history],
                    [r["loss"] for r in history])], log_y=(True,)).save(paths.curve)
    if world > 1:
        dist.barrier()
    return TrainResult(paths, total, seconds, final_loss, parameters, scale)
