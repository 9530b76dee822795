"""The flow-matching objective (`flow:`): how training sigmas are drawn and shifted, what the loss targets and
weighs, the eval loss's fixed sigmas, and scheduled sampling (rollout)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from raytune_sd3.config.section import Section


class ScheduledSamplingConfig(Section):
    """Scheduled sampling (rollout, SimpleTuner's experimental feature): for a chosen batch item, the current model
    (LoRA on, no gradient) denoises from a noisier sigma k Euler steps down to the drawn one, and the step trains on
    that self-made latent instead of the plain noised one, so the model learns to correct its own drift."""

    max_step_offset: int = Field(ge=0)
    """Largest rollout length: k is drawn uniformly in 0..max_step_offset for each chosen item, and each step spans
    one of the training schedule's 1000 timesteps (shifted as flow.shift shifts them). Each step is one more
    forward pass (no gradient) per item: 5-10 is SimpleTuner's advice."""
    ramp_steps: int = Field(0, ge=0)
    """Ramp the chance linearly from prob_start at step 0 to prob_end at this step (then hold it); 0: no ramp."""
    probability: float | None = Field(None, ge=0, le=1)
    """Chance that an item is rolled out, without a ramp; default 1.0. Not with ramp_steps (use prob_start/end)."""
    prob_start: float | None = Field(None, ge=0, le=1)
    """The chance at step 0 of the ramp (ramp_steps); default 0.0."""
    prob_end: float | None = Field(None, ge=0, le=1)
    """The chance from step ramp_steps on (ramp_steps); default 0.5, as SimpleTuner's."""

    @field_validator("probability", "prob_start", "prob_end")
    @classmethod
    def _ramp_or_fixed(cls, v: float | None, info: ValidationInfo) -> float | None:
        ramp = info.data.get("ramp_steps", 0)  # validated before these (the order of the fields)
        if v is None:
            return v
        if info.field_name == "probability" and ramp:
            raise ValueError(f"is the fixed chance, and ramp_steps {ramp} ramps it: give prob_start and prob_end "
                             "with the ramp, or remove ramp_steps")
        if info.field_name != "probability" and not ramp:
            raise ValueError("sets the probability ramp, which ramp_steps turns on: set ramp_steps (e.g. 1000), "
                             "or give probability instead")
        return v

    def probability_at(self, step: int) -> float:
        """The chance that an item of optimizer step `step` (1-based) is rolled out."""
        if self.ramp_steps == 0:
            return 1.0 if self.probability is None else self.probability
        start = 0.0 if self.prob_start is None else self.prob_start
        end = 0.5 if self.prob_end is None else self.prob_end
        return start + (end - start) * min(step / self.ramp_steps, 1.0)


class FlowConfig(Section):
    sigma_sampling: Literal["logit_normal", "uniform", "mode"] = "logit_normal"
    """How training sigmas are drawn: sigmoid(N(logit_mean, logit_std)), U(0,1), or SD3's mode sampling."""
    logit_mean: float = 0.0
    """Mean of the normal behind logit-normal sigmas."""
    logit_std: float = Field(1.0, gt=0)
    """Std of the normal behind logit-normal sigmas."""
    mode_scale: float = 1.29
    """Scale of mode sampling."""
    shift: float | Literal["auto"] = 3.0
    """Sigma shift s*sigma/(1+(s-1)*sigma): a number (SD3 3.0; Stability's SD3.5 notes 1.0) or `auto` (from the
    image sequence length, as Flux/SimpleTuner)."""
    prediction: Literal["velocity", "x0"] = "velocity"
    """Loss target: `velocity` (noise - latents, plain MSE; SimpleTuner, SD3.5) or `x0` (diffusers' preconditioning:
    pred * -sigma + noisy against the latents)."""
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Per-sample loss weight (diffusers' compute_loss_weighting_for_sd3)."""
    eval_sigmas: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    """Fixed sigmas at which the eval loss is measured (unshifted)."""
    scheduled_sampling: ScheduledSamplingConfig | None = None
    """Scheduled sampling (rollout): train some items on latents the model rolled out itself (max_step_offset,
    probability or a ramp); null (default): off. Extra forward passes, no extra memory; not with train.strategy
    zero3."""

    @field_validator("shift")
    @classmethod
    def _positive_shift(cls, v: float | str) -> float | str:
        if v != "auto" and v <= 0:
            raise ValueError(f"shift must be > 0 or 'auto', got {v}")
        return v

    @field_validator("eval_sigmas")
    @classmethod
    def _sigmas_in_range(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < s < 1 for s in v):
            raise ValueError(f"eval_sigmas must be a non-empty list of values in (0, 1), got {v}")
        return v
