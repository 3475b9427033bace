"""Sampling avatars from a trained diffusion model: seeded noise -> DDIM (η = the model's sample_eta) ->
weights -> avatar files.

DDIM runs on the tokenizer's projected pieces rather than on all D weights: x_t enters the denoiser only
through the linear ``tokenizer.project``, and every DDIM state is a linear combination of x_T and earlier x0
predictions (and, with η > 0, fresh noises), so projecting once and mapping each prediction back with
width x width matrices (``Tokenizer.composites``) gives the same x0 as :func:`schedule.ddim_sample` on the
full vectors (to float rounding; tested) at a fraction of the cost (the per-layer projections dominate the
model). The fresh noise is drawn already projected (``Tokenizer.noise_factors``: the same law).

With an eps or v model (``diffusion.prediction``) the output is not in the decoder's span and DDIM runs on
the full vectors (:func:`schedule.ddim_sample`), as a measured alternative only: it costs a full projection
per step.

Each identity is denoised on its own (batch 1) from the noise of ``torch.Generator().manual_seed(seed)``
(x_T, then with η > 0 each step's fresh noise from the same generator), so a seed always gives the same
avatar bit for bit, whatever else is sampled with it. The identity slider interpolates either in noise
space (slerp of two seeds' noises, then DDIM) or, between two avatar files,
linearly in weight space (meaningful because all fits share one consistent initialisation).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..avatar.io import SUFFIX as AVATAR_SUFFIX
from ..devices import log_stderr, resolve_device
from ..errors import HDAError
from . import MAX_SAMPLES, MAX_SEED
from .model_io import DiffusionModel, load_diffusion
from .schedule import ScheduleConfig, alphas_cumprod, ddim_sample, ddim_step, ddim_timesteps
from .tokenizers import Tokenizer
from .transformer import WeightDenoiser
from .weights import load_weight_set, write_avatar


def check_steps(model: DiffusionModel, steps: int | None) -> int:
    steps = model.config.sample_steps if steps is None else steps
    if not 1 <= steps <= model.config.timesteps:
        raise HDAError(f"--steps {steps}: expected 1..{model.config.timesteps} (the model's diffusion timesteps T)")
    return steps


def check_seed(seed: int, name: str = "--seed") -> int:
    if not 0 <= seed <= MAX_SEED:
        raise HDAError(f"{name} {seed}: expected 0..{MAX_SEED}")
    return seed


Draw = Callable[[tuple], torch.Tensor]  # shape -> standard normal values of that shape, from a seed


def seed_noise(seed: int, dim: int) -> tuple[torch.Tensor, Draw]:
    """(x_T [D], draw) for a seed, the same on every machine (CPU generator): draw(shape) gives the fresh
    noise of the next DDIM step with η > 0, from the same generator after x_T."""
    generator = torch.Generator().manual_seed(check_seed(seed))
    x_T = torch.randn(dim, generator=generator)
    return x_T, lambda shape: torch.randn(shape, generator=generator)


@torch.no_grad()
def ddim_sample_projected(denoiser: WeightDenoiser, composites: list, x_T: torch.Tensor, steps: int,
                          config: ScheduleConfig, eta: float = 0.0,
                          step_noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """DDIM from x_T [B, D] like :func:`schedule.ddim_sample` (x0 prediction), stepping the projected pieces
    [B, L, width]; with η > 0, step_noise() [B, L, width] is each step's fresh noise, projected (the step is
    linear: ``project(z)`` for full noise z gives exactly the full DDIM's sample)."""
    abar = alphas_cumprod(config)
    ts = ddim_timesteps(config.timesteps, steps)
    project = denoiser.tokenizer.project
    e = project(x_T)
    for i, t in enumerate(ts):
        h = denoiser.hidden(e, torch.full((x_T.shape[0],), t, dtype=torch.long, device=x_T.device))
        if i + 1 == len(ts):  # the last step lands on ᾱ = 1: its x0 prediction is the sample
            return denoiser.tokenizer.decode(h)
        noise = step_noise().to(x_T.device) if eta > 0.0 else None
        e = ddim_step(e, Tokenizer.reproject(h, composites), t, ts[i + 1], abar, eta, noise)


@torch.no_grad()
def ddim_sample_full(model: DiffusionModel, x_T: torch.Tensor, steps: int, eta: float = 0.0,
                     step_noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """DDIM on the full vectors x_T [B, D] for any prediction target (eps and v models)."""
    return ddim_sample(model.denoiser, x_T, steps, model.schedule, model.config.prediction, eta, step_noise)


@torch.no_grad()
def denoise_noise(model: DiffusionModel, noise: torch.Tensor, steps: int | None = None, draw: Draw | None = None,
                  eta: float | None = None) -> torch.Tensor:
    """noise: [D] standard normal x_T -> weights [D] (DDIM, then the normaliser decoded). η (default the
    model's ``sample_eta``) > 0 needs ``draw`` for each step's fresh noise: an x0 model draws it already
    projected ([L, width] through ``Tokenizer.noise_factors``, the same law as projecting D values, at a
    fraction of the cost), an eps or v model as D values."""
    steps = check_steps(model, steps)
    eta = model.config.sample_eta if eta is None else eta
    if eta > 0.0 and draw is None:
        raise HDAError(f"DDIM eta {eta}: sampling needs a source of step noise (a seed)")
    device = next(model.denoiser.parameters()).device
    x_T = noise.to(device)[None]
    if model.config.prediction == "x0":
        shape = (model.denoiser.tokenizer.num_tokens, model.config.width)
        step_noise = (lambda: Tokenizer.reproject(draw(shape)[None].to(device), model.noise_factors)) if draw else None
        z = ddim_sample_projected(model.denoiser, model.composites, x_T, steps, model.schedule, eta, step_noise)[0]
    else:
        step_noise = (lambda: draw((model.spec.dim,))[None]) if draw else None
        z = ddim_sample_full(model, x_T, steps, eta, step_noise)[0]
    return model.normalizer.decode(z.cpu())


def sample_vectors(model: DiffusionModel, seeds: list[int], steps: int | None = None,
                   eta: float | None = None) -> torch.Tensor:
    """seeds: S ints -> weights [S, D]; row i depends only on seeds[i] (each is denoised alone)."""
    rows = []
    for s in seeds:
        x_T, draw = seed_noise(s, model.spec.dim)
        rows.append(denoise_noise(model, x_T, steps, draw, eta))
    return torch.stack(rows)


def _as_model(model) -> DiffusionModel:
    return model if isinstance(model, DiffusionModel) else load_diffusion(model)


def sample_avatars(model_path, seed: int, n: int, steps: int | None, out_dir, progress: bool = False,
                   device: str | torch.device | None = None, log: Callable[[str], None] = log_stderr) -> list[Path]:
    """Write ``out_dir/sample_<s>.hda.safetensors`` for s = seed .. seed+n-1; ``model_path``: a path or a
    loaded :class:`DiffusionModel`. ``device``: auto | cpu | cuda[:N] to denoise on (None: where the
    model is); the noise of a seed is drawn on the CPU, so every device starts from the same x_T."""
    if not 1 <= n <= MAX_SAMPLES:
        raise HDAError(f"--n {n}: expected 1..{MAX_SAMPLES}")
    check_seed(seed)
    check_seed(seed + n - 1, "--seed + --n - 1")
    model = _as_model(model_path)
    steps = check_steps(model, steps)
    if device is not None:  # once the arguments are known to be good
        model.to(resolve_device(device, log))
    out_dir = Path(out_dir)
    paths = []
    for s in tqdm(range(seed, seed + n), desc="sample", unit="avatar", disable=not progress):
        vec = sample_vectors(model, [s], steps)[0]
        paths.append(write_avatar(vec, model.spec, model.meta, out_dir / f"sample_{s}{AVATAR_SUFFIX}",
                                  origin=f"sample:{s} model:{model.path.name} steps:{steps}"))
    return paths


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of a, b [D]: keeps the norm statistics of Gaussian noise (a lerp would shrink it)."""
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if theta.abs() < 1e-6:
        return (1.0 - t) * a + t * b
    return (torch.sin((1.0 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def _check_t(t: float) -> float:
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise HDAError(f"--t {t}: expected a number in [0, 1]")
    return t


def interpolate_noise(model, seed_a: int, seed_b: int, t: float, steps: int | None = None) -> torch.Tensor:
    """Weights [D] of the identity at ``t`` between seeds a (t=0) and b (t=1): slerp in noise space (x_T and,
    with η > 0, each step's noise), then DDIM."""
    model = _as_model(model)
    _check_t(t)
    a, draw_a = seed_noise(seed_a, model.spec.dim)
    b, draw_b = seed_noise(seed_b, model.spec.dim)
    return denoise_noise(model, slerp(a, b, t), steps,
                         lambda shape: slerp(draw_a(shape).flatten(), draw_b(shape).flatten(), t).reshape(shape))


def interpolate_avatars(path_a, path_b, t: float, out) -> Path:
    """(1-t)·a + t·b in weight space, written as an avatar file; both avatars must share the architecture."""
    _check_t(t)
    data = load_weight_set([path_a, path_b])
    vec = (1.0 - t) * data.vectors[0] + t * data.vectors[1]
    return write_avatar(vec, data.spec, data.meta, out,
                        origin=f"interpolate:{Path(path_a).name}:{Path(path_b).name}:{t:g}")


def bench_sample(model: DiffusionModel, out_dir, n: int = 3, steps: int | None = None) -> dict:
    """Seconds per identity, noise to avatar file written (after one warm-up identity)."""
    steps = check_steps(model, steps)
    sample_avatars(model, 0, 1, steps, out_dir)
    times = []
    for s in range(1, n + 1):
        start = time.perf_counter()
        sample_avatars(model, s, 1, steps, out_dir)
        times.append(time.perf_counter() - start)
    return {"steps": steps, "n": n, "median_s": sorted(times)[len(times) // 2], "min_s": min(times),
            "tokenizer": model.config.tokenizer, "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.denoiser.parameters())}
