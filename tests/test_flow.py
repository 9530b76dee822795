"""The flow objective against diffusers' scheduler and training utilities, and hand-computed values."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from raytune_sd3.config import FlowConfig
from raytune_sd3.flow import (
    auto_shift,
    draw_noise,
    flow_loss,
    image_seq_len,
    loss_weighting,
    make_flow_batch,
    noisy_input,
    resolve_shift,
    sample_sigmas,
    shift_sigmas,
)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5, 7.5])
def test_shift_equals_the_schedulers(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    unshifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    torch.testing.assert_close(shift_sigmas(unshifted, shift), sched.sigmas, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("side", [256, 512, 768, 1024, 1536])
def test_auto_shift_equals_diffusers_calculate_shift(side):
    seq = image_seq_len(side // 8, side // 8)
    assert auto_shift(seq) == pytest.approx(math.exp(calculate_shift(seq)), rel=1e-9)


def test_auto_shift_values_by_resolution():
    assert resolve_shift(FlowConfig(shift="auto"), 64, 64) == pytest.approx(1.877, abs=1e-3)  # 512px
    assert resolve_shift(FlowConfig(shift="auto"), 128, 128) == pytest.approx(3.158, abs=1e-3)  # 1024px
    assert resolve_shift(FlowConfig(shift=2.0), 128, 128) == 2.0


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_sigma_sampling_equals_diffusers_density(scheme):
    cfg = FlowConfig(sigma_sampling=scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ours = sample_sigmas(cfg, 64, torch.Generator().manual_seed(5))
    ref = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                                                generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, ref)
    assert ours.min() > 0 and ours.max() < 1


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_equals_diffusers(scheme):
    s = torch.tensor([0.05, 0.3, 0.5, 0.95])
    torch.testing.assert_close(loss_weighting(scheme, s), compute_loss_weighting_for_sd3(scheme, s))


def test_noisy_input_and_velocity_loss_by_hand():
    latents = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])  # (2, 1, 1, 2)
    noise = torch.tensor([[[[0.0, 1.0]]], [[[2.0, 2.0]]]])
    sigmas = torch.tensor([0.25, 0.5])
    # (1 - s) * x + s * n
    torch.testing.assert_close(noisy_input(latents, noise, sigmas),
                               torch.tensor([[[[0.75, 1.75]]], [[[1.0, 0.5]]]]))
    # target n - x = [[-1, -1], [2, 3]]; pred zeros -> per-sample mean squares [1, 6.5]
    loss = flow_loss(FlowConfig(), torch.zeros_like(latents), latents, noise, sigmas)
    torch.testing.assert_close(loss, torch.tensor([1.0, 6.5]))


def test_x0_preconditioned_loss_by_hand():
    latents = torch.tensor([[[[1.0, 2.0]]]])
    noise = torch.tensor([[[[0.0, 1.0]]]])
    sigmas = torch.tensor([0.5])
    pred = torch.tensor([[[[2.0, 0.0]]]])
    # noisy = [0.5, 1.5]; x0 = pred * -0.5 + noisy = [-0.5, 1.5]; error vs x = [-1.5, -0.5] -> mean sq 1.25
    cfg = FlowConfig(prediction="x0", weighting="none")
    torch.testing.assert_close(flow_loss(cfg, pred, latents, noise, sigmas), torch.tensor([1.25]))
    # sigma_sqrt weights by sigma^-2 = 4
    cfg = FlowConfig(prediction="x0", weighting="sigma_sqrt")
    torch.testing.assert_close(flow_loss(cfg, pred, latents, noise, sigmas), torch.tensor([5.0]))


def test_flow_batch_is_reproducible_and_shifted():
    cfg = FlowConfig(shift=3.0)
    latents = torch.randn(3, 16, 8, 8)
    a = make_flow_batch(cfg, latents, torch.Generator().manual_seed(1))
    b = make_flow_batch(cfg, latents, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.noisy, b.noisy)
    raw = sample_sigmas(cfg, 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.sigmas, shift_sigmas(raw, 3.0))
    torch.testing.assert_close(a.timesteps, a.sigmas * 1000)


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_noise_drawn_ahead_equals_noise_drawn_in_the_step(scheme):
    """The loop draws each micro-batch's sigmas and noise in its read-ahead thread (draw_noise). The reference is
    the step as written before the read-ahead, independently of our code: the sigmas from diffusers' density
    (compute_density_for_timestep_sampling), then the noise (torch.randn), in that order from one CPU generator.
    The batch built from the drawn-ahead tensors is bitwise the reference's, so trajectories did not change."""
    cfg = FlowConfig(shift=3.0, sigma_sampling=scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    latents = torch.randn(2, 16, 8, 8)
    g = torch.Generator().manual_seed(7)
    ref_sigmas = compute_density_for_timestep_sampling(scheme, 2, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                                                       generator=g)
    ref_noise = torch.randn(tuple(latents.shape), generator=g)
    shifted = 3.0 * ref_sigmas / (1 + 2.0 * ref_sigmas)
    ref_noisy = (1 - shifted.view(-1, 1, 1, 1)) * latents + shifted.view(-1, 1, 1, 1) * ref_noise

    sigmas, noise = draw_noise(cfg, tuple(latents.shape), torch.Generator().manual_seed(7))
    assert noise.dtype == torch.float32 and sigmas.shape == (2,)
    torch.testing.assert_close(sigmas, ref_sigmas, rtol=0, atol=0)
    torch.testing.assert_close(noise, ref_noise, rtol=0, atol=0)
    ahead = make_flow_batch(cfg, latents, sigmas=sigmas, noise=noise)
    torch.testing.assert_close(ahead.noise, ref_noise, rtol=0, atol=0)
    torch.testing.assert_close(ahead.sigmas, shifted)
    torch.testing.assert_close(ahead.timesteps, shifted * 1000)
    torch.testing.assert_close(ahead.noisy, ref_noisy)
    inline = make_flow_batch(cfg, latents, torch.Generator().manual_seed(7))  # drawn in the step: the same
    for name in ("noisy", "timesteps", "sigmas", "noise"):
        torch.testing.assert_close(getattr(ahead, name), getattr(inline, name), rtol=0, atol=0)
    other = make_flow_batch(cfg, latents, torch.Generator().manual_seed(8))
    assert not torch.equal(other.noise, inline.noise)


@pytest.mark.parametrize("prediction,weighting", [("velocity", "none"), ("x0", "sigma_sqrt"), ("x0", "cosmap")])
def test_masked_loss_equals_torch_with_diffusers_weighting(prediction, weighting):
    """flow_loss with a latent-space mask against the loss of diffusers' SD3 LoRA script written out in torch
    (x0: pred * -sigma + noisy vs latents, weighted by compute_loss_weighting_for_sd3), the squared error
    multiplied by the mask before the per-sample mean (SimpleTuner's masked loss)."""
    g = torch.Generator().manual_seed(0)
    latents, noise, pred = (torch.randn(3, 16, 4, 4, generator=g) for _ in range(3))
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    mask = torch.rand(3, 1, 4, 4, generator=g)  # one channel, as the cache stores it: broadcast over the 16
    mask[0] = 1.0

    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    model_pred, target = (pred * -s + noisy, latents) if prediction == "x0" else (pred, noise - latents)
    weight = compute_loss_weighting_for_sd3(weighting, s)
    expected = torch.mean((weight * mask * (model_pred - target) ** 2).reshape(3, -1), 1)

    cfg = FlowConfig(prediction=prediction, weighting=weighting)
    torch.testing.assert_close(flow_loss(cfg, pred, latents, noise, sigmas, mask), expected)
    unmasked = torch.mean((weight * (model_pred - target) ** 2).reshape(3, -1), 1)
    torch.testing.assert_close(flow_loss(cfg, pred, latents, noise, sigmas), unmasked)
    assert not torch.allclose(expected[1:], unmasked[1:])  # the mask matters where it is not all ones
