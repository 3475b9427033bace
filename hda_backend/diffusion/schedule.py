"""DDPM forward process and deterministic DDIM sampling (eta = 0), as stateless functions.

HyperDiffusion's recipe, which HDA follows: T = 500 steps, betas linear from 1e-4 to 2e-2 (the raw
linspace, not guided-diffusion's 1000/T rescaling), the model predicts x0 (``diffusion.prediction``; eps and
v are the measured alternatives, converted to x0 by :func:`predicted_x0` before every DDIM step).

The DDIM step matches diffusers' ``DDIMScheduler(num_train_timesteps=T, beta_schedule="linear",
beta_start, beta_end, prediction_type="sample", clip_sample=False, set_alpha_to_one=True,
steps_offset=0, timestep_spacing="trailing", thresholding=False)`` with ``eta=0``:

- ``ddim_timesteps(T, K)`` = round(T - i·T/K) - 1 for i = 0..K-1, so sampling always starts at the
  noisiest step t = T-1 ("trailing"; "leading" would start at (K-1)·(T//K), below T-1);
- each step goes to the next listed timestep and the last one to t_prev = -1, where ᾱ = 1
  (``set_alpha_to_one``), so the final output is exactly the model's x0 prediction, as in
  HyperDiffusion's ``ddim_sample_loop``. With K = T this is HyperDiffusion's full 500-step DDIM;
- with η > 0, σ = η·sqrt((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev)) of fresh noise is added (diffusers' ``eta``
  with ``variance_noise``); η = 1 has the DDPM posterior's variance.

(diffusers takes t_prev = t - T//K inside ``step``; that equals the next listed timestep when K divides
T, which is when the two agree step for step; tests/test_diffusion_ddim.py checks it.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import HDAError
from . import PREDICTIONS


@dataclass(frozen=True)
class ScheduleConfig:
    timesteps: int = 500  # T
    beta_start: float = 1e-4
    beta_end: float = 2e-2

    def to_dict(self) -> dict:
        return asdict(self)


# float32 throughout, in the same order of operations as diffusers: near t = 0, 1-ᾱ_t is tiny and the
# ε re-derived from x0 amplifies any rounding difference, so a float64 schedule would not agree to 1e-6.


def betas(config: ScheduleConfig) -> torch.Tensor:
    """[T] float32, linear from beta_start to beta_end."""
    return torch.linspace(config.beta_start, config.beta_end, config.timesteps, dtype=torch.float32)


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """[T] float32: ᾱ_t = Π_{s<=t} (1 - β_s)."""
    return torch.cumprod(1.0 - betas(config), dim=0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """q(x_t | x0): x0, noise [B, D]; t [B] long in [0, T); abar [T] -> x_t [B, D] = √ᾱ_t x0 + √(1-ᾱ_t) ε."""
    a = abar.to(device=x0.device, dtype=x0.dtype)[t][:, None]
    return a ** 0.5 * x0 + (1.0 - a) ** 0.5 * noise


def _at(abar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t [B, 1] for timesteps t [B], in like's dtype and device."""
    return abar.to(device=like.device, dtype=like.dtype)[t][:, None]


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
                      prediction: str) -> torch.Tensor:
    """What the denoiser learns to output for x_t = add_noise(x0, noise, t): x0; eps = noise; or
    v = √ᾱ_t ε - √(1-ᾱ_t) x0 (Salimans & Ho 2022). x0, noise [B, D]; t [B] long -> [B, D]."""
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return noise
    if prediction == "v":
        a = _at(abar, t, x0)
        return a ** 0.5 * noise - (1.0 - a) ** 0.5 * x0
    raise HDAError(f"prediction {prediction!r}: expected one of {', '.join(PREDICTIONS)}")


def predicted_x0(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
                 prediction: str) -> torch.Tensor:
    """The x0 that a denoiser ``output`` [B, D] for x_t [B, D] at t [B] implies (the inverse of
    :func:`prediction_target`): eps -> (x_t - √(1-ᾱ) ε̂) / √ᾱ; v -> √ᾱ x_t - √(1-ᾱ) v̂."""
    if prediction == "x0":
        return output
    a = _at(abar, t, x_t)
    if prediction == "eps":
        return (x_t - (1.0 - a) ** 0.5 * output) / a ** 0.5
    if prediction == "v":
        return a ** 0.5 * x_t - (1.0 - a) ** 0.5 * output
    raise HDAError(f"prediction {prediction!r}: expected one of {', '.join(PREDICTIONS)}")


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The K sampling timesteps, descending from T-1 (trailing spacing)."""
    if not 1 <= steps <= timesteps:
        raise HDAError(f"DDIM steps {steps}: expected 1..{timesteps} (the number of training timesteps T)")
    ratio = timesteps / steps
    return [int(round(timesteps - i * ratio)) - 1 for i in range(steps)]


def ddim_sigma(t: int, t_prev: int, abar: torch.Tensor, eta: float) -> torch.Tensor:
    """The std of the fresh noise of a DDIM step: η·sqrt((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev)); 0 at t_prev < 0."""
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else torch.ones((), dtype=abar.dtype, device=abar.device)
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5


def ddim_step(x_t: torch.Tensor, x0_pred: torch.Tensor, t: int, t_prev: int, abar: torch.Tensor,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step from x_t [B, D] given the model's x0_pred [B, D]; ``noise`` [B, D] ~ N(0, I) when η > 0.

    ε̂ = (x_t - √ᾱ_t x̂0) / √(1-ᾱ_t);  x_{t_prev} = √ᾱ_prev x̂0 + √(1-ᾱ_prev-σ²) ε̂ + σ·noise, with
    σ = :func:`ddim_sigma` and ᾱ_prev = 1 for t_prev < 0.
    """
    abar = abar.to(device=x_t.device, dtype=x_t.dtype)
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else torch.ones((), dtype=x_t.dtype, device=x_t.device)
    eps = (x_t - a_t ** 0.5 * x0_pred) / (1 - a_t) ** 0.5
    if eta == 0.0 or t_prev < 0:
        return a_prev ** 0.5 * x0_pred + (1 - a_prev) ** 0.5 * eps
    if noise is None:
        raise HDAError(f"DDIM eta {eta}: a noise tensor is needed for eta > 0")
    sigma = ddim_sigma(t, t_prev, abar, eta)
    return a_prev ** 0.5 * x0_pred + (1 - a_prev - sigma ** 2) ** 0.5 * eps + sigma * noise


def ddim_sample(denoise, x_T: torch.Tensor, steps: int, config: ScheduleConfig, prediction: str = "x0",
                eta: float = 0.0, step_noise=None) -> torch.Tensor:
    """Run DDIM from noise x_T [B, D]; denoise(x_t [B, D], t [B] long) -> its output [B, D] (``prediction``).
    With η > 0, step_noise() -> [B, D] gives each step's fresh N(0, I) noise. Returns x0 [B, D]."""
    abar = alphas_cumprod(config)
    ts = ddim_timesteps(config.timesteps, steps)
    x = x_T
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0 = predicted_x0(denoise(x, tt), x, tt, abar, prediction)
        noise = step_noise().to(x.device) if eta > 0.0 and t_prev >= 0 else None
        x = ddim_step(x, x0, t, t_prev, abar, eta, noise)
    return x
