"""The DDPM/DDIM math against diffusers' DDIMScheduler (a test-only dependency), step for step."""

import pytest
import torch

from hda_backend.diffusion.schedule import (ScheduleConfig, add_noise, alphas_cumprod, ddim_sample, ddim_step,
                                            ddim_timesteps, predicted_x0, prediction_target)
from hda_backend.errors import HDAError

diffusers = pytest.importorskip("diffusers")

CONFIG = ScheduleConfig(timesteps=500, beta_start=1e-4, beta_end=2e-2)


def _scheduler():
    return diffusers.DDIMScheduler(num_train_timesteps=500, beta_schedule="linear", beta_start=1e-4,
                                   beta_end=2e-2, prediction_type="sample", clip_sample=False,
                                   set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing",
                                   thresholding=False)


def test_alphas_cumprod_and_add_noise_match_diffusers():
    sched = _scheduler()
    abar = alphas_cumprod(CONFIG)
    assert torch.allclose(abar.float(), sched.alphas_cumprod, atol=1e-6, rtol=0)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 37, generator=gen), torch.randn(6, 37, generator=gen)
    t = torch.tensor([0, 1, 57, 250, 498, 499])
    assert torch.allclose(add_noise(x0, noise, t, abar), sched.add_noise(x0, noise, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 10, 50, 500])
def test_ddim_matches_diffusers_step_for_step(steps):
    sched = _scheduler()
    sched.set_timesteps(steps)
    ours = ddim_timesteps(500, steps)
    assert sched.timesteps.tolist() == ours
    abar = alphas_cumprod(CONFIG)
    gen = torch.Generator().manual_seed(steps)
    x_ref = x_ours = torch.randn(4, 64, generator=gen)
    for i, t in enumerate(ours):
        x0_pred = torch.randn(4, 64, generator=gen)  # stands in for the model's output at this step
        x_ref = sched.step(x0_pred, t, x_ref, eta=0.0).prev_sample
        x_ours = ddim_step(x_ours, x0_pred, t, ours[i + 1] if i + 1 < steps else -1, abar)
        assert torch.allclose(x_ours, x_ref, atol=1e-6, rtol=0), (i, t, (x_ours - x_ref).abs().max())
    # The last step lands on ᾱ = 1: the output is the final x0 prediction itself.
    assert torch.allclose(x_ours, x0_pred, atol=1e-6)


def test_ddim_step_with_diffusers_previous_timestep_when_k_does_not_divide_t():
    # For K not dividing T, diffusers steps to t - T//K; our step takes t_prev explicitly, so the math agrees.
    sched = _scheduler()
    sched.set_timesteps(30)
    abar = alphas_cumprod(CONFIG)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, generator=gen)
    for t in sched.timesteps.tolist():
        x0_pred = torch.randn(3, 16, generator=gen)
        ref = sched.step(x0_pred, t, x, eta=0.0).prev_sample
        assert torch.allclose(ddim_step(x, x0_pred, t, t - 500 // 30, abar), ref, atol=1e-6, rtol=0)
        x = ref


def test_ddim_sample_recovers_a_point_mass():
    # If the data is one point c, the ideal x0-predictor always returns c, and DDIM must end exactly at c.
    c = torch.linspace(-2, 2, 10)[None]
    out = ddim_sample(lambda x, t: c.expand_as(x), torch.randn(2, 10), 25, CONFIG)
    assert torch.allclose(out, c.expand(2, 10), atol=1e-6)


def test_ddim_steps_out_of_range():
    for k in (0, 501):
        with pytest.raises(HDAError, match="DDIM steps"):
            ddim_timesteps(500, k)


@pytest.mark.parametrize("prediction, diffusers_type", [("eps", "epsilon"), ("v", "v_prediction")])
def test_prediction_targets_and_their_x0_match_diffusers(prediction, diffusers_type):
    sched = _scheduler()
    abar = alphas_cumprod(CONFIG)
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(5, 33, generator=gen), torch.randn(5, 33, generator=gen)
    t = torch.tensor([0, 3, 120, 333, 499])
    x_t = add_noise(x0, noise, t, abar)
    target = prediction_target(x0, noise, t, abar, prediction)
    # diffusers' own definitions: the noise itself, or get_velocity's v = √ᾱ ε - √(1-ᾱ) x0.
    expected = noise if prediction == "eps" else sched.get_velocity(x0, noise, t)
    assert torch.allclose(target, expected, atol=1e-6, rtol=0)
    # A perfect prediction gives back x0 (eps is ill-conditioned at the noisiest step: looser there).
    assert torch.allclose(predicted_x0(target, x_t, t, abar, prediction), x0, atol=2e-4, rtol=0)
    assert torch.equal(predicted_x0(x0, x_t, t, abar, "x0"), x0)
    # One DDIM step on the converted x0 equals diffusers' step for that prediction type.
    ref = diffusers.DDIMScheduler(num_train_timesteps=500, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2,
                                  prediction_type=diffusers_type, clip_sample=False, set_alpha_to_one=True,
                                  steps_offset=0, timestep_spacing="trailing", thresholding=False)
    ref.set_timesteps(10)
    out = torch.randn(1, 33, generator=gen)
    x = torch.randn(1, 33, generator=gen)
    for step_t in ref.timesteps.tolist()[:3]:
        tt = torch.tensor([step_t])
        ours = ddim_step(x, predicted_x0(out, x, tt, abar, prediction), step_t, step_t - 50, abar)
        assert torch.allclose(ours, ref.step(out, step_t, x, eta=0.0).prev_sample, atol=1e-5, rtol=0)


def test_unknown_prediction_is_refused():
    x = torch.zeros(1, 2)
    with pytest.raises(HDAError, match="prediction 'noise'"):
        prediction_target(x, x, torch.tensor([0]), alphas_cumprod(CONFIG), "noise")


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_matches_diffusers(eta):
    sched = _scheduler()
    sched.set_timesteps(10)
    ours = ddim_timesteps(500, 10)
    abar = alphas_cumprod(CONFIG)
    gen = torch.Generator().manual_seed(4)
    x_ref = x_ours = torch.randn(2, 24, generator=gen)
    for i, t in enumerate(ours):
        x0_pred, noise = torch.randn(2, 24, generator=gen), torch.randn(2, 24, generator=gen)
        x_ref = sched.step(x0_pred, t, x_ref, eta=eta, variance_noise=noise).prev_sample
        x_ours = ddim_step(x_ours, x0_pred, t, ours[i + 1] if i + 1 < 10 else -1, abar, eta, noise)
        assert torch.allclose(x_ours, x_ref, atol=1e-5, rtol=0), (i, t, (x_ours - x_ref).abs().max())
    assert torch.allclose(x_ours, x0_pred, atol=1e-6)  # the last step still lands on the x0 prediction


def test_ddim_sample_with_eta_recovers_a_point_mass():
    c = torch.linspace(-1, 1, 6)[None]
    gen = torch.Generator().manual_seed(0)
    out = ddim_sample(lambda x, t: c.expand_as(x), torch.randn(3, 6), 25, CONFIG, "x0", 1.0,
                      lambda: torch.randn(3, 6, generator=gen))
    assert torch.allclose(out, c.expand(3, 6), atol=1e-6)
