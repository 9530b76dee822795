"""Rectified-flow (flow matching) objective of SD3, written once: training, eval loss and benchmarks use it.

    sigma ~ density (logit-normal by default), shifted:  sigma' = s*sigma / (1 + (s-1)*sigma)
    noisy  = (1 - sigma') * latents + sigma' * noise
    model(noisy, t = sigma' * 1000) -> v
    velocity target (default):  loss = mean((v - (noise - latents))^2)
    x0 target (diffusers):      loss = mean(w(sigma') * (v * -sigma' + noisy - latents)^2)

Scheduled sampling (flow.scheduled_sampling) replaces `noisy` of a chosen item by what the model itself makes of it:
noised to a sigma k training timesteps above the drawn one, then k Euler steps x <- x + (s_next - s) * v down to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from raytune_sd3.config import FlowConfig, ScheduledSamplingConfig

NUM_TRAIN_TIMESTEPS = 1000  # SD3's scheduler: timestep = sigma * 1000


def sample_sigmas(cfg: FlowConfig, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unshifted sigmas in (0, 1), shape (batch_size,), drawn on the CPU from `generator` (fp32)."""
    if cfg.sigma_sampling == "logit_normal":
        u = torch.normal(cfg.logit_mean, cfg.logit_std, size=(batch_size,), generator=generator)
        return torch.sigmoid(u)
    u = torch.rand(batch_size, generator=generator)
    if cfg.sigma_sampling == "mode":
        # SD3 paper eq. 20: density with a mode, heavier in the middle for mode_scale > 0.
        return 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def auto_shift(image_seq_len: int) -> float:
    """Resolution-dependent shift (Flux/SimpleTuner): mu linear in seq_len through (256, 0.5), (4096, 1.15); e^mu."""
    mu = 0.5 + (image_seq_len - 256) * (1.15 - 0.5) / (4096 - 256)
    return math.exp(mu)


def image_seq_len(latent_height: int, latent_width: int, patch_size: int = 2) -> int:
    """Transformer tokens of one latent: (h/p) * (w/p)."""
    return (latent_height // patch_size) * (latent_width // patch_size)


def resolve_shift(cfg: FlowConfig, latent_height: int, latent_width: int) -> float:
    return auto_shift(image_seq_len(latent_height, latent_width)) if cfg.shift == "auto" else float(cfg.shift)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """s*sigma / (1 + (s-1)*sigma): the same map FlowMatchEulerDiscreteScheduler applies to its schedule."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(1 - sigma) * latents + sigma * noise, sigma per sample."""
    s = _per_sample(sigmas, latents)
    return (1 - s) * latents + s * noise


def loss_weighting(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample weights: none -> 1, sigma_sqrt -> sigma^-2, cosmap -> 2 / (pi * (1 - 2s + 2s^2))."""
    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def flow_loss(
    cfg: FlowConfig,
    model_pred: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    mask: torch.Tensor | None = None,
    noisy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss, shape (B,), computed in fp32. `sigmas` are the shifted ones used to build the input;
    `noisy` is the input the model saw where it is not the plain noised latents (a rollout's)."""
    pred, latents, noise = model_pred.float(), latents.float(), noise.float()
    if cfg.prediction == "velocity":
        target = noise - latents
    else:  # diffusers' preconditioning: turn the velocity into an x0 estimate
        seen = noisy_input(latents, noise, sigmas) if noisy is None else noisy.float()
        pred = pred * -_per_sample(sigmas, pred) + seen
        target = latents
    err = (pred - target) ** 2
    if mask is not None:
        err = err * mask
    per_sample = err.flatten(1).mean(1)
    return per_sample * loss_weighting(cfg.weighting, sigmas.to(per_sample.device).float())


@dataclass
class FlowBatch:
    """What one transformer call needs, built from clean latents."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    noise: torch.Tensor


def draw_noise(cfg: FlowConfig, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The unshifted sigmas (B,) and fp32 noise `shape` of one batch, drawn in this order from the CPU `generator`.

    Drawing on the CPU keeps the random stream identical across devices, so a resumed or re-sharded run is
    reproducible; the training loop draws them in its read-ahead thread, off the step's critical path.
    """
    sigmas = sample_sigmas(cfg, shape[0], generator)
    return sigmas, torch.randn(shape, generator=generator, dtype=torch.float32)


def make_flow_batch(
    cfg: FlowConfig,
    latents: torch.Tensor,
    generator: torch.Generator | None = None,
    sigmas: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> FlowBatch:
    """Shift the unshifted `sigmas` and build the noisy input from `latents` and `noise` (fp32, any device), both
    as draw_noise makes them (the loop draws them ahead); without them, they are drawn here from `generator`."""
    if noise is None or sigmas is None:
        sigmas, noise = draw_noise(cfg, tuple(latents.shape), generator)
    noise = noise.to(latents.device, latents.dtype, non_blocking=True)
    sigmas = shift_sigmas(sigmas.to(latents.device, non_blocking=True),
                          resolve_shift(cfg, latents.shape[-2], latents.shape[-1]))
    return FlowBatch(noisy_input(latents, noise, sigmas), sigmas * NUM_TRAIN_TIMESTEPS, sigmas, noise)


# --- scheduled sampling (rollout) ----------------------------------------------------------------------------------


def draw_rollout_steps(ss: ScheduledSamplingConfig, step: int, batch_size: int,
                       generator: torch.Generator) -> torch.Tensor:
    """Rollout length k of each item of optimizer step `step`, (batch_size,) int64 on the CPU: 0 for an item not
    chosen (chance ss.probability_at(step)), else uniform in 0..max_step_offset. Both draws are made for every item,
    in this order, so the stream does not depend on the chance (a ramp changes which items roll, not their k)."""
    chosen = torch.rand(batch_size, generator=generator) < ss.probability_at(step)
    k = torch.randint(0, ss.max_step_offset + 1, (batch_size,), generator=generator)
    return k * chosen


def rollout_sigmas(target: torch.Tensor, k: int, shift: float) -> torch.Tensor:
    """The k + 1 shifted sigmas (fp32) a rollout of k Euler steps visits, noisiest first, ending at the unshifted
    scalar `target` (shifted as the step shifts it). The grid is the training schedule's (FlowMatchEulerDiscrete-
    Scheduler's 1000 timesteps: 1/1000 apart before the shift, as SimpleTuner rolls over its training timesteps),
    squeezed to end at pure noise (sigma 1) where target + k/1000 would pass it."""
    target = target.float().reshape(1)
    source = torch.clamp(target + k / NUM_TRAIN_TIMESTEPS, max=1.0)
    steps = torch.arange(k, -1, -1, dtype=torch.float32) / k  # 1 .. 0
    return shift_sigmas(target + (source - target) * steps, shift)


RolloutVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""velocity(x (n, C, H, W), timesteps (n,), index (n,) long): the model's prediction for the batch items `index`."""


@torch.no_grad()
def rolled_out_input(velocity: RolloutVelocity, latents: torch.Tensor, noise: torch.Tensor, plain: torch.Tensor,
                     sigmas: torch.Tensor, rollout_steps: torch.Tensor, shift: float) -> torch.Tensor:
    """The model's input with scheduled sampling: `plain` (B, C, H, W, the plain noised latents of make_flow_batch)
    where rollout_steps[i] is 0, else the item noised at rollout_sigmas(sigmas[i], k)[0] with the same noise and
    stepped k times as FlowMatchEulerDiscreteScheduler.step does (x + (s_next - s) * v in fp32, back to x's dtype).
    `sigmas` (B,) unshifted and `rollout_steps` (B,) are the CPU draws: every decision here is made on the host from
    them, so the rollout reads nothing back from the device. Items roll in lockstep with their ends aligned (pass j
    steps the items with k >= longest - j), so each pass is one forward over the items still rolling."""
    ks = [int(k) for k in rollout_steps]
    longest = max(ks, default=0)
    if longest == 0:
        return plain
    rolled = [i for i, k in enumerate(ks) if k]
    grids = {i: rollout_sigmas(sigmas[i], ks[i], shift) for i in rolled}
    x = plain.clone()
    index = _to(torch.tensor(rolled), plain.device)
    source = _to(torch.stack([grids[i][0] for i in rolled]), plain.device)
    x[index] = noisy_input(latents[index], noise[index], source)
    for j in range(longest):
        active = [i for i in rolled if ks[i] >= longest - j]
        at = [j - (longest - ks[i]) for i in active]  # each item's place on its own grid
        now = torch.stack([grids[i][a] for i, a in zip(active, at, strict=True)])
        step = torch.stack([grids[i][a + 1] for i, a in zip(active, at, strict=True)]) - now
        index, now, step = (_to(t, plain.device) for t in (torch.tensor(active), now, step))
        v = velocity(x[index], now * NUM_TRAIN_TIMESTEPS, index)
        moved = x[index].float()
        x[index] = (moved + _per_sample(step, moved) * v.float()).to(x.dtype)
    return x


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto `device` without a host sync (pinned, so the copy is queued, not waited for)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
