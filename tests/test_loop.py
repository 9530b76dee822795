"""The training loop's stop rule: each divergence trigger on its own, at its threshold and just past it."""

import math
from pathlib import Path

from raytune_sd3.config import load_job
from raytune_sd3.train.loop import divergence_reason

ROOT = Path(__file__).resolve().parents[1]


def job(*overrides: str):
    return load_job(ROOT / "jobs" / "tiny.yaml", list(overrides))


def test_too_many_nonfinite_steps_diverge():
    cfg = job("train.max_nonfinite_steps=3")
    calm = {"step": 9, "loss": 1.0, "grad_norm": 1.0}
    assert divergence_reason(calm, 1.0, 3, cfg) is None  # up to the limit the bad steps are only skipped
    assert "4 steps with a non-finite loss or gradient" in divergence_reason(calm, 1.0, 4, cfg)
    assert divergence_reason(calm, 1.0, 1, job("train.max_nonfinite_steps=0")) is not None


def test_eval_loss_rising_past_the_factor_diverges():
    cfg = job("train.divergence_factor=2.0")
    assert divergence_reason({"step": 20, "eval_loss": 1.99}, 1.0, 0, cfg) is None
    assert divergence_reason({"step": 20, "eval_loss": 2.0}, 1.0, 0, cfg) is None  # "above" the factor
    assert "rose above 2.0 x its initial 1" in divergence_reason({"step": 20, "eval_loss": 2.01}, 1.0, 0, cfg)
    assert divergence_reason({"step": 20, "eval_loss": 2.01}, 1.0, 0, job()) is None  # no factor, no rule
    assert divergence_reason({"step": 21, "loss": 50.0}, 1.0, 0, cfg) is None  # steps without an eval loss
    assert divergence_reason({"step": 20, "eval_loss": math.nan}, 1.0, 0, job()) == "eval loss is not finite"


def test_gradient_norm_past_the_limit_diverges():
    cfg = job("train.grad_norm_limit=100")
    assert divergence_reason({"step": 3, "grad_norm": 100.0}, None, 0, cfg) is None
    assert "gradient norm 100.5 above train.grad_norm_limit=100" in divergence_reason(
        {"step": 3, "grad_norm": 100.5}, None, 0, cfg)
    assert divergence_reason({"step": 3, "grad_norm": 1e9}, None, 0, job()) is None  # no limit, no rule
    # an infinite norm is a skipped step, counted by max_nonfinite_steps, not this rule
    assert divergence_reason({"step": 3, "grad_norm": math.inf}, None, 0, cfg) is None
