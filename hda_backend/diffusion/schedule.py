"""DDPM forward process and deterministic DDIM sampling (eta = 0), as stateless functions.

HyperDiffusion's recipe, which HDA follows: T = 500 steps, betas linear from 1e-4 to 2e-2 (the raw
linspace, not guided-diffusion's 1000/T rescaling), the model predicts x0.

The DDIM step matches diffusers' ``DDIMScheduler(num_train_timesteps=T, beta_schedule="linear",
beta_start, beta_end, prediction_type="sample", clip_sample=False, set_alpha_to_one=True,
steps_offset=0, timestep_spacing="trailing", thresholding=False)`` with ``eta=0``:

- ``ddim_timesteps(T, K)`` = round(T - i·T/K) - 1 for i = 0..K-1, so sampling always starts at the
  noisiest step t = T-1 ("trailing"; "leading" would start at (K-1)·(T//K), below T-1);
- each step goes to the next listed timestep and the last one to t_prev = -1, where ᾱ = 1
  (``set_alpha_to_one``), so the final output is exactly the model's x0 prediction, as in
  HyperDiffusion's ``ddim_sample_loop``. With K = T this is HyperDiffusion's full 500-step DDIM.

(diffusers takes t_prev = t - T//K inside ``step``; that equals the next listed timestep when K divides
T, which is when the two agree step for step; tests/test_diffusion_ddim.py checks it.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import HDAError


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


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The K sampling timesteps, descending from T-1 (trailing spacing)."""
    if not 1 <= steps <= timesteps:
        raise HDAError(f"DDIM steps {steps}: expected 1..{timesteps} (the number of training timesteps T)")
    ratio = timesteps / steps
    return [int(round(timesteps - i * ratio)) - 1 for i in range(steps)]


def ddim_step(x_t: torch.Tensor, x0_pred: torch.Tensor, t: int, t_prev: int, abar: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from x_t [B, D] given the model's x0_pred [B, D].

    ε̂ = (x_t - √ᾱ_t x̂0) / √(1-ᾱ_t);  x_{t_prev} = √ᾱ_prev x̂0 + √(1-ᾱ_prev) ε̂, with ᾱ_prev = 1 for t_prev < 0.
    """
    abar = abar.to(device=x_t.device, dtype=x_t.dtype)
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else torch.ones((), dtype=x_t.dtype, device=x_t.device)
    eps = (x_t - a_t ** 0.5 * x0_pred) / (1 - a_t) ** 0.5
    return a_prev ** 0.5 * x0_pred + (1 - a_prev) ** 0.5 * eps


def ddim_sample(denoise, x_T: torch.Tensor, steps: int, config: ScheduleConfig) -> torch.Tensor:
    """Run DDIM from noise x_T [B, D]; denoise(x_t [B, D], t [B] long) -> x0_pred [B, D]. Returns x0 [B, D]."""
    abar = alphas_cumprod(config)
    ts = ddim_timesteps(config.timesteps, steps)
    x = x_T
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x0 = denoise(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        x = ddim_step(x, x0, t, t_prev, abar)
    return x
