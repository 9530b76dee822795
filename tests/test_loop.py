"""The training loop's stop rule (each divergence trigger on its own, at its threshold and just past it), its noise
stream, and its LR schedules against diffusers' get_scheduler and their formulas."""

import math
from pathlib import Path

import pytest

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


# --- the LR schedule -----------------------------------------------------------------------------------------------


def _lrs(cfg, steps: int) -> list[float]:
    import torch

    from raytune_sd3.train.loop import make_lr_schedule
    from raytune_sd3.train.optim import make_optimizer, start_training

    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.train)
    schedule = make_lr_schedule(opt, cfg)
    start_training(opt)
    return _stepped(opt, schedule, steps)


def _stepped(opt, schedule, steps: int) -> list[float]:
    """The learning rate of each of `steps` optimizer steps."""
    lrs = []
    for _ in range(steps):
        lrs.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    return lrs


def _diffusers(name: str, lr: float, steps: int, **kw) -> list[float]:
    import torch
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    return _stepped(opt, get_scheduler(name, opt, **kw), steps)


def test_polynomial_schedule_is_diffusers_and_the_formula():
    """lr(s) = (lr0 - 1e-7) (1 - (s - w) / (T - w))^power + 1e-7 after a linear warmup over w steps, as diffusers'
    get_scheduler("polynomial") (SimpleTuner's and diffusers' scripts' reference) computes it, step for step."""
    cfg = job("train.lr_scheduler=polynomial", "train.lr_power=2.0", "train.lr_warmup_steps=4", "train.max_steps=40",
              "train.learning_rate=0.01")
    ours = _lrs(cfg, 40)
    assert ours == _diffusers("polynomial", 0.01, 40, num_warmup_steps=4, num_training_steps=40, power=2.0)
    by_hand = [0.01 * s / 4 if s < 4 else (0.01 - 1e-7) * (1 - (s - 4) / 36) ** 2 + 1e-7 for s in range(40)]
    assert ours == pytest.approx(by_hand, rel=1e-9, abs=1e-12)
    assert ours != pytest.approx(_lrs(job("train.lr_scheduler=polynomial", "train.lr_warmup_steps=4",
                                          "train.max_steps=40", "train.learning_rate=0.01"), 40))  # power matters


def test_cosine_with_restarts_is_diffusers_and_the_formula():
    """After the warmup, lr_num_cycles cosine decays, each from the peak: lr0 * (1 + cos(pi * (cycles * p mod 1)))/2
    with p the post-warmup progress, as diffusers' get_scheduler("cosine_with_restarts")."""
    cfg = job("train.lr_scheduler=cosine_with_restarts", "train.lr_num_cycles=3", "train.lr_warmup_steps=4",
              "train.max_steps=40", "train.learning_rate=0.01")
    ours = _lrs(cfg, 40)
    assert ours == _diffusers("cosine_with_restarts", 0.01, 40, num_warmup_steps=4, num_training_steps=40,
                              num_cycles=3)
    by_hand = [0.01 * s / 4 if s < 4 else 0.01 * 0.5 * (1 + math.cos(math.pi * ((3 * (s - 4) / 36) % 1.0)))
               for s in range(40)]
    assert ours == pytest.approx(by_hand, rel=1e-9, abs=1e-12)
    assert [s for s in range(5, 40) if ours[s] > ours[s - 1]] == [16, 28]  # the two restarts, at the peak again
    assert ours[16] == pytest.approx(0.01)


def test_schedule_free_warms_up_inside_the_optimizer_and_its_schedule_stays_flat():
    cfg = job("train.optimizer=adamw_schedulefree", "train.lr_scheduler=constant", "train.lr_warmup_steps=4")
    assert _lrs(cfg, 10) == [0.01] * 10  # the schedule; the optimizer ramps (test_optim: applied_lr, the formula)
    assert _lrs(job("train.lr_scheduler=constant", "train.lr_warmup_steps=4"), 6) == [0.0, 0.0025, 0.005, 0.0075,
                                                                                     0.01, 0.01]


def test_polynomial_needs_a_learning_rate_above_where_it_ends():
    from raytune_sd3.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.learning_rate 1e-07: the polynomial schedule decays to 1e-07"):
        job("train.lr_scheduler=polynomial", "train.learning_rate=1e-7")
