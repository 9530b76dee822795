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


def test_read_ahead_noise_is_drawn_from_the_seed_of_the_step_and_the_place_in_the_global_batch():
    """The read-ahead thread (WorkerRun._with_noise) draws a micro-batch's sigmas, then its noise, from a generator
    seeded by numpy's SeedSequence([train.seed, step, micro * world + rank]) (the reference, written out here): so
    rank 1 of 2 at micro-step 0 draws what the single worker of an elastic restart draws at micro-step 1."""
    import numpy as np
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from raytune_sd3.train.loop import WorkerRun

    cfg = job("train.seed=11", "flow.sigma_sampling=logit_normal")

    def drawn(world: int, rank: int, step: int, micro: int) -> dict:
        run = WorkerRun.__new__(WorkerRun)  # its __init__ needs Ray Train's context; _with_noise does not
        run.cfg, run.t, run.world, run.rank = cfg, cfg.train, world, rank
        return run._with_noise((step - 1, micro), {"latents": torch.zeros(2, 16, 4, 4)})

    f = cfg.flow
    for slot, places in ((1, [(2, 1, 0), (1, 0, 1), (4, 1, 0)]), (3, [(2, 1, 1), (1, 0, 3), (4, 3, 0)])):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([11, 5, slot]).generate_state(1)[0]))
        sigmas = compute_density_for_timestep_sampling("logit_normal", 2, logit_mean=f.logit_mean,
                                                       logit_std=f.logit_std, mode_scale=f.mode_scale, generator=g)
        noise = torch.randn(2, 16, 4, 4, generator=g)
        for world, rank, micro in places:
            batch = drawn(world, rank, step=5, micro=micro)
            assert torch.equal(batch["sigmas"], sigmas) and torch.equal(batch["noise"], noise), (world, rank, micro)
    assert not torch.equal(drawn(2, 0, step=5, micro=1)["noise"], noise)  # slot 2
    assert not torch.equal(drawn(2, 1, step=6, micro=1)["noise"], noise)  # slot 3 of the next step
