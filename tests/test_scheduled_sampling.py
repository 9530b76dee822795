"""Scheduled sampling (flow.scheduled_sampling): a rollout against diffusers' FlowMatchEulerDiscreteScheduler stepping
the same tiny model, the plain step untouched where nothing rolls, the draws' stream and ramp, and the door."""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from raytune_sd3.config import ConfigError, FlowConfig, LoraConfig, ScheduledSamplingConfig, load_job
from raytune_sd3.flow import draw_rollout_steps, flow_loss, make_flow_batch, rolled_out_input
from raytune_sd3.models.loading import load_transformer
from raytune_sd3.models.lora import add_lora
from tests import worker_run

ROOT = Path(__file__).resolve().parents[1]
SHIFT = 3.0


def job(*overrides: str):
    return load_job(ROOT / "jobs" / "tiny.yaml", list(overrides))


def one_worker_job(*overrides: str):
    return job("train.num_workers=1", "train.mixed_precision=no", "model.dtype=fp32", "train.learning_rate=0.05",
               "train.batch_size=3", *overrides)


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd3):
    """The tiny transformer (fp32) with a LoRA moved off its init (B != 0), so 'LoRA on' changes the rollout."""
    transformer = load_transformer(tiny_sd3, torch.float32)
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return transformer.eval()


def _inputs(transformer, batch: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    return {"latents": torch.randn(batch, c.in_channels, 8, 8, generator=g),
            "noise": torch.randn(batch, c.in_channels, 8, 8, generator=g),
            "prompt": torch.randn(batch, 7, c.joint_attention_dim, generator=g),
            "pooled": torch.randn(batch, c.pooled_projection_dim, generator=g)}


def _velocity(transformer, x: dict):
    def velocity(hidden, timesteps, index):
        return transformer(hidden_states=hidden, timestep=timesteps, encoder_hidden_states=x["prompt"][index],
                           pooled_projections=x["pooled"][index], return_dict=False)[0]
    return velocity


def _ours(transformer, x: dict, sigmas: torch.Tensor, steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain noised input, our input with the rollout) for unshifted `sigmas` and rollout lengths `steps`."""
    fb = make_flow_batch(FlowConfig(shift=SHIFT), x["latents"], sigmas=sigmas, noise=x["noise"])
    rolled = rolled_out_input(_velocity(transformer, x), x["latents"], x["noise"], fb.noisy, sigmas,
                              torch.tensor(steps), SHIFT)
    return fb.noisy, rolled


def _diffusers(transformer, x: dict, i: int, unshifted: list[float]) -> torch.Tensor:
    """Item i rolled by the library: its scheduler given the unshifted sigmas of the grid (it shifts them), the
    start noised by its scale_noise, then one scheduler.step per sigma but the last."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    sched.set_timesteps(sigmas=unshifted)
    one = slice(i, i + 1)
    sample = sched.scale_noise(x["latents"][one], sched.timesteps[:1], x["noise"][one])
    with torch.no_grad():
        for t in sched.timesteps[:-1]:
            v = transformer(hidden_states=sample, timestep=t.expand(1), encoder_hidden_states=x["prompt"][one],
                            pooled_projections=x["pooled"][one], return_dict=False)[0]
            sample = sched.step(v, t, sample).prev_sample
    return sample[0]


# --- the train step (WorkerRun.train_step on the tiny model, without Ray) --------------------------------------


tiny_run = functools.partial(worker_run.tiny_run, batch=3)  # 3 items: a rolled batch can mix lengths


def trained(run, steps) -> tuple[dict[str, torch.Tensor], list[dict]]:
    metrics = [run.train_step(step) for step in steps]
    weights = {n: p.detach().clone() for n, p in run.strategy.transformer.named_parameters() if p.requires_grad}
    return weights, metrics


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_offset_0_or_probability_0_trains_bitwise_the_plain_step(tiny_sd3, prediction):
    plain, plain_metrics = trained(tiny_run(tiny_sd3, one_worker_job(f"flow.prediction={prediction}")), [1, 2])
    for rollout in (["flow.scheduled_sampling.max_step_offset=0"],
                    ["flow.scheduled_sampling.max_step_offset=4", "flow.scheduled_sampling.probability=0"]):
        weights, metrics = trained(tiny_run(tiny_sd3, one_worker_job(f"flow.prediction={prediction}", *rollout)),
                                   [1, 2])
        assert all(torch.equal(weights[n], w) for n, w in plain.items()), rollout
        assert [m["loss"] for m in metrics] == [m["loss"] for m in plain_metrics]
        assert [m["rollout_steps"] for m in metrics] == [0.0, 0.0]
    # and a rollout does change the step (the test above would pass if the loop ignored the feature)
    weights, metrics = trained(tiny_run(tiny_sd3, one_worker_job(f"flow.prediction={prediction}",
                                                                 "flow.scheduled_sampling.max_step_offset=4")), [1, 2])
    assert not all(torch.equal(weights[n], w) for n, w in plain.items())
    assert [m["loss"] for m in metrics] != [m["loss"] for m in plain_metrics]
    from raytune_sd3.train.loop import rollout_steps_of

    cfg = one_worker_job("flow.scheduled_sampling.max_step_offset=4")
    assert [m["rollout_steps"] for m in metrics] == [float(rollout_steps_of(cfg, s, 0).float().mean()) for s in (1, 2)]
    assert metrics[0]["rollout_steps"] > 0


def test_the_x0_loss_of_the_step_reads_the_input_the_model_was_given(tiny_sd3, monkeypatch):
    """flow.prediction x0 turns the prediction into x0 from the model's input: with a rollout, the rolled one."""
    from raytune_sd3.train import loop

    seen = {}
    run = tiny_run(tiny_sd3, one_worker_job("flow.prediction=x0", "flow.scheduled_sampling.max_step_offset=4"))
    forward, loss = run._forward, loop.flow_loss

    def spied_forward(model, batch, fb):
        seen["input"] = fb.noisy
        return forward(model, batch, fb)

    def spied_loss(*args, noisy=None, **kwargs):
        seen["noisy"] = noisy
        return loss(*args, noisy=noisy, **kwargs)

    monkeypatch.setattr(run, "_forward", spied_forward)
    monkeypatch.setattr(loop, "flow_loss", spied_loss)
    run.train_step(1)
    assert seen["noisy"] is not None and torch.equal(seen["noisy"], seen["input"])


def test_the_step_flops_count_one_forward_of_an_item_per_rolled_step(tiny_sd3):
    """MFU counts the rollout's forwards: F_train + k_total x F_forward / batch (flops.FlopCount, one forward)."""
    run = tiny_run(tiny_sd3, one_worker_job("flow.scheduled_sampling.max_step_offset=4"))
    batch = run.batches.get()
    fb = make_flow_batch(run.cfg.flow, batch["latents"], sigmas=batch["sigmas"], noise=batch["noise"])
    plain = {k: v for k, v in batch.items() if k != "rollout_steps"}
    base = run._train_flops(plain, batch["latents"], fb)
    count = run.flops_of_shape[tuple(batch["latents"].shape)]
    assert base == count.training() > count.forward > 0
    rolled = {**batch, "rollout_steps": torch.tensor([2, 0, 4])}
    assert run._train_flops(rolled, batch["latents"], fb) == base + count.forward * 6 // 3


def test_a_resumed_run_rolls_out_as_the_straight_run_did(tiny_sd3, tmp_path):
    """Steps 1-4 straight, and 1-2 then a checkpoint and a fresh worker for 3-4: bitwise the same LoRA (the rollout
    draws come from the step's seed, not from a generator state that a checkpoint would have to carry)."""
    from raytune_sd3.train.checkpoint import save_checkpoint

    cfg = one_worker_job("flow.scheduled_sampling.max_step_offset=3", "flow.scheduled_sampling.ramp_steps=4",
                         "flow.scheduled_sampling.prob_start=0.5", "flow.scheduled_sampling.prob_end=1")
    straight, straight_metrics = trained(tiny_run(tiny_sd3, cfg), [1, 2, 3, 4])
    first = tiny_run(tiny_sd3, cfg)
    trained(first, [1, 2])
    save_checkpoint(tmp_path, first.strategy.lora_tensors(), cfg.lora, first.lr_schedule, 2)
    torch.save(first.strategy.optimizer.state_dict(), tmp_path / "optimizer.pt")
    resumed, resumed_metrics = trained(tiny_run(tiny_sd3, cfg, resume_from=tmp_path), [3, 4])
    assert all(torch.equal(resumed[n], w) for n, w in straight.items())
    assert [m["loss"] for m in resumed_metrics] == [m["loss"] for m in straight_metrics[2:]]
    assert sum(m["rollout_steps"] for m in straight_metrics[2:]) > 0


def test_a_rollout_equals_diffusers_euler_scheduler_stepping_the_same_model(tiny_lora):
    """Rollouts of 3 and 1 steps over the training schedule's grid (1/1000 apart before the shift), one of 2 steps
    squeezed below pure noise, one item not rolled: each equals the library's Euler steps, the last bitwise plain."""
    x = _inputs(tiny_lora)
    sigmas = torch.tensor([0.3, 0.62, 0.9995, 0.5])
    steps = [3, 1, 2, 0]
    plain, rolled = _ours(tiny_lora, x, sigmas, steps)
    for i, grid in ((0, [0.3 + 3e-3, 0.3 + 2e-3, 0.3 + 1e-3, 0.3]), (1, [0.62 + 1e-3, 0.62]),
                    (2, list(np.linspace(1.0, 0.9995, 3)))):
        grid = [float(np.float32(s)) for s in grid[:-1]] + [float(sigmas[i])]
        torch.testing.assert_close(rolled[i], _diffusers(tiny_lora, x, i, grid), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(rolled[i], plain[i], atol=1e-4)  # the model's own steps, not the plain noising
    assert torch.equal(rolled[3], plain[3])


def test_longer_rollouts_in_one_batch_equal_each_item_rolled_alone(tiny_lora):
    """Items of different lengths roll in lockstep (ends aligned): each equals its own rollout as a batch of one."""
    x = _inputs(tiny_lora)
    sigmas = torch.tensor([0.2, 0.45, 0.7, 0.8])
    steps = [4, 1, 0, 2]
    _, together = _ours(tiny_lora, x, sigmas, steps)
    for i in (0, 1, 3):
        alone = {k: v[i:i + 1] for k, v in x.items()}
        _, single = _ours(tiny_lora, alone, sigmas[i:i + 1], [steps[i]])
        torch.testing.assert_close(together[i], single[0], rtol=1e-5, atol=1e-6)


def test_nothing_rolled_is_bitwise_the_plain_step(tiny_lora):
    """Offset 0 (or probability 0): nothing is drawn to roll, and the input is the plain one itself (the train step
    on top of it: test_offset_0_or_probability_0_trains_bitwise_the_plain_step)."""
    x = _inputs(tiny_lora)
    sigmas = torch.tensor([0.3, 0.6, 0.2, 0.9])
    generator = torch.Generator().manual_seed(0)
    for ss in (ScheduledSamplingConfig(max_step_offset=0), ScheduledSamplingConfig(max_step_offset=5, probability=0)):
        steps = draw_rollout_steps(ss, 7, 4, generator)
        assert not steps.any()
        plain, rolled = _ours(tiny_lora, x, sigmas, steps.tolist())
        assert rolled is plain


def test_the_x0_loss_reads_the_rolled_input():
    """With the x0 target the loss turns the prediction into x0 from the input the model saw: the rolled one."""
    cfg = FlowConfig(prediction="x0")
    latents, noise, pred = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    sigmas = torch.tensor([0.5])
    rolled = torch.full((1, 2, 2, 2), 0.25)
    assert flow_loss(cfg, pred, latents, noise, sigmas).item() == pytest.approx(0.25)  # (0.5 noise)^2
    assert flow_loss(cfg, pred, latents, noise, sigmas, noisy=rolled).item() == pytest.approx(0.0625)


def test_the_draws_come_from_the_seed_of_the_step_and_slot_so_a_resumed_run_draws_the_same():
    """The read-ahead thread draws each micro-batch's rollout lengths from SeedSequence([seed, step, slot, 1]): the
    noise stream is what it is without the feature, and a resumed run (a fresh worker, nothing restored but the step)
    draws the same lengths; the chance first, then k, for every item (the reference, written out here)."""
    from raytune_sd3.train.loop import WorkerRun, rollout_steps_of

    cfg = job("train.seed=11", "train.batch_size=6", "flow.scheduled_sampling.max_step_offset=4",
              "flow.scheduled_sampling.probability=0.5")
    plain = job("train.seed=11", "train.batch_size=6")

    def drawn(c, world: int, rank: int, step: int, micro: int) -> dict:
        run = WorkerRun.__new__(WorkerRun)  # its __init__ needs Ray Train's context; _with_noise does not
        run.cfg, run.t, run.world, run.rank = c, c.train, world, rank
        return run._with_noise((step - 1, micro), {"latents": torch.zeros(6, 16, 4, 4)})

    g = torch.Generator().manual_seed(int(np.random.SeedSequence([11, 5, 3, 1]).generate_state(1)[0]))
    chosen = torch.rand(6, generator=g) < 0.5
    expected = torch.randint(0, 5, (6,), generator=g) * chosen
    first = drawn(cfg, 2, 1, step=5, micro=1)  # slot 3
    assert torch.equal(first["rollout_steps"], expected) and expected.any() and not expected.all()
    later = [drawn(cfg, 2, 1, step=s, micro=1) for s in (7, 6, 5)][-1]  # drawn again, after other steps
    assert torch.equal(later["rollout_steps"], expected)
    assert torch.equal(drawn(cfg, 1, 0, step=5, micro=3)["rollout_steps"], expected)  # elastic: same slot
    assert torch.equal(rollout_steps_of(cfg, 5, 3), expected)  # what the step's rollout_steps metric averages
    off = drawn(plain, 2, 1, step=5, micro=1)
    assert "rollout_steps" not in off
    assert torch.equal(off["noise"], first["noise"]) and torch.equal(off["sigmas"], first["sigmas"])


def test_the_probability_ramps_linearly_then_holds():
    ramp = ScheduledSamplingConfig(max_step_offset=3, ramp_steps=100, prob_start=0.1, prob_end=0.9)
    assert [ramp.probability_at(s) for s in (0, 25, 50, 100, 400)] == pytest.approx([0.1, 0.3, 0.5, 0.9, 0.9])
    simpletuner = ScheduledSamplingConfig(max_step_offset=3, ramp_steps=10)  # its defaults: 0.0 -> 0.5
    assert [simpletuner.probability_at(s) for s in (0, 5, 10)] == pytest.approx([0.0, 0.25, 0.5])
    assert ScheduledSamplingConfig(max_step_offset=3).probability_at(1) == 1.0
    assert ScheduledSamplingConfig(max_step_offset=3, probability=0.3).probability_at(1000) == 0.3
    # the share of items chosen follows it: none at the start of a 0 -> 1 ramp, half midway, all at its end
    full = ScheduledSamplingConfig(max_step_offset=1, ramp_steps=1000, prob_start=0.0, prob_end=1.0)
    shares = []
    for step in (0, 500, 1000):
        g = torch.Generator().manual_seed(0)
        chosen = torch.stack([draw_rollout_steps(full, step, 1000, g) for _ in range(2)])  # k=0 half the time
        shares.append(float((chosen > 0).float().mean()))
    assert shares[0] == 0 and shares[1] == pytest.approx(0.25, abs=0.03) and shares[2] == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("overrides, key, message", [
    (["flow.scheduled_sampling.max_step_offset=-1"], "flow.scheduled_sampling.max_step_offset",
     "greater than or equal to 0"),
    (["flow.scheduled_sampling.max_step_offset=2", "flow.scheduled_sampling.probability=1.5"],
     "flow.scheduled_sampling.probability", "less than or equal to 1"),
    (["flow.scheduled_sampling.max_step_offset=2", "flow.scheduled_sampling.probability=-0.1"],
     "flow.scheduled_sampling.probability", "greater than or equal to 0"),
    (["flow.scheduled_sampling.max_step_offset=2", "flow.scheduled_sampling.ramp_steps=10",
      "flow.scheduled_sampling.prob_end=2"], "flow.scheduled_sampling.prob_end", "less than or equal to 1"),
    (["flow.scheduled_sampling.max_step_offset=2", "flow.scheduled_sampling.prob_start=0.1"],
     "flow.scheduled_sampling.prob_start", "ramp_steps"),
    (["flow.scheduled_sampling.max_step_offset=2", "flow.scheduled_sampling.prob_end=0.1"],
     "flow.scheduled_sampling.prob_end", "ramp_steps"),
    (["flow.scheduled_sampling.max_step_offset=2", "flow.scheduled_sampling.ramp_steps=10",
      "flow.scheduled_sampling.probability=0.5"], "flow.scheduled_sampling.probability", "prob_start"),
    (["flow.scheduled_sampling.probability=0.5"], "flow.scheduled_sampling.max_step_offset", "missing"),
    (["flow.scheduled_sampling.max_step_offset=2", "train.strategy=zero3"], "flow.scheduled_sampling",
     "zero3"),
])
def test_bad_settings_are_refused_at_the_door_naming_the_key(overrides, key, message):
    with pytest.raises(ConfigError) as err:
        job(*overrides)
    text = str(err.value)
    assert key in text and message in text, text


def test_off_by_default_and_the_resolved_job_loads_again():
    from raytune_sd3.config import JobConfig, dump_job, parse_yaml

    assert job().flow.scheduled_sampling is None
    cfg = job("flow.scheduled_sampling.max_step_offset=3", "flow.scheduled_sampling.ramp_steps=20")
    again = JobConfig.model_validate(parse_yaml(dump_job(cfg)))
    assert again.flow.scheduled_sampling == cfg.flow.scheduled_sampling
