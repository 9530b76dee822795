"""The EMA of the LoRA weights (train/ema.py) on real steps of the train loop (WorkerRun.train_step) on the tiny
model, without Ray: against the formula, through a checkpoint and resume, and as a file diffusers loads."""

from pathlib import Path

import pytest
import torch

from raytune_sd3.config import ConfigError, load_job
from raytune_sd3.models.lora import export_lora
from raytune_sd3.run_layout import EMA_LORA as EMA_LORA_FILE
from raytune_sd3.train.checkpoint import save_checkpoint
from raytune_sd3.train.ema import ema_decay_at
from raytune_sd3.train.loop import WorkerRun
from tests.worker_run import tiny_run

ROOT = Path(__file__).resolve().parents[1]


def job(*overrides: str):
    return load_job(ROOT / "jobs" / "tiny.yaml", ["train.num_workers=1", "train.mixed_precision=no",
                                                  "model.dtype=fp32", *overrides])


def trainable(run: WorkerRun) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.strategy.transformer.named_parameters() if p.requires_grad}


def test_the_ema_follows_the_formula_over_real_steps(tiny_sd3):
    cfg = job("train.ema_decay=0.3", "train.learning_rate=0.05")
    run = tiny_run(tiny_sd3, cfg)
    expected = {n: t.double() for n, t in trainable(run).items()}
    for step in range(1, 7):
        run.train_step(step)
        d = min(0.3, (1 + step - 1) / (10 + step - 1))  # the documented warm-up: 0.1, 0.18, 0.25, then 0.3
        assert d == ema_decay_at(0.3, step - 1)
        weights = trainable(run)
        expected = {n: d * e + (1 - d) * weights[n].double() for n, e in expected.items()}
    assert run.ema.updates == 6
    assert ema_decay_at(0.3, 2) < 0.3 == ema_decay_at(0.3, 3)  # the last three steps used the configured decay
    for name, ema in run.ema.shadow.items():
        assert ema.dtype == torch.float32
        torch.testing.assert_close(ema.double(), expected[name], rtol=1e-6, atol=1e-7)
    # the EMA is not the weights: a wrong formula (or none) would not sit at this distance from both
    weights = trainable(run)
    lag = sum((run.ema.shadow[n] - w).abs().sum() for n, w in weights.items())
    assert lag > 1e-3 * sum(w.abs().sum() for n, w in weights.items() if "lora_B" in n)


def test_the_ema_resumes_where_it_stopped(tiny_sd3, tmp_path):
    cfg = job("train.ema_decay=0.7", "train.learning_rate=0.05")
    straight = tiny_run(tiny_sd3, cfg)
    for step in range(1, 5):
        straight.train_step(step)

    first = tiny_run(tiny_sd3, cfg)
    for step in range(1, 3):
        first.train_step(step)
    save_checkpoint(tmp_path, first.strategy.lora_tensors(), cfg.lora, first.lr_schedule, 2)
    torch.save(first.strategy.optimizer.state_dict(), tmp_path / "optimizer.pt")
    first.ema.save(tmp_path)
    resumed = tiny_run(tiny_sd3, cfg, resume_from=tmp_path)
    assert resumed.start_step == 2 and resumed.ema.updates == 2
    for step in range(3, 5):
        resumed.train_step(step)
    for name, ema in straight.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[name], ema), name
    # a checkpoint without an EMA (ema_decay turned on at a resume) starts it from the resumed weights
    (tmp_path / "lora_ema_raw.safetensors").unlink()
    late = tiny_run(tiny_sd3, cfg, resume_from=tmp_path)
    assert late.ema.updates == 0
    assert all(torch.equal(late.ema.shadow[n], w) for n, w in trainable(late).items())


def test_the_ema_file_loads_like_the_lora_and_validation_can_swap_it_in(tiny_sd3, tiny_pipe, tmp_path):
    cfg = job("train.ema_decay=0.9", "train.learning_rate=0.05", "lora.alpha=4")
    run = tiny_run(tiny_sd3, cfg)
    for step in range(1, 4):
        run.train_step(step)
    export_lora(tmp_path, run.ema.lora_tensors(), cfg.lora, EMA_LORA_FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [EMA_LORA_FILE]

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(tmp_path, weight_name=EMA_LORA_FILE)
    loaded = {k.replace(".default_0.", ".default."): v for k, v in pipe.transformer.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(run.ema.shadow)
    scale = 4 / cfg.lora.rank  # alpha folded into lora_B, as in the plain LoRA file
    for name, ema in run.ema.shadow.items():
        torch.testing.assert_close(loaded[name], ema * (scale if "lora_B" in name else 1.0))

    trained = trainable(run)
    with run.ema.swapped_in():
        assert all(torch.equal(p, run.ema.shadow[n]) for n, p in run.ema.params.items())
    assert all(torch.equal(p, trained[n]) for n, p in run.ema.params.items())


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.ema_decay=1.0"], "train.ema_decay: 1.0 is outside (0, 1)"),
    (["train.ema_decay=0"], "train.ema_decay: 0.0 is outside (0, 1)"),
    (["train.ema_decay=-0.5"], "is outside (0, 1)"),
    (["train.ema_decay=0.99", "train.strategy=zero3"], "ZeRO-3 partitions the LoRA weights"),
    (["validation.use_ema=true"], "validation.use_ema samples with the EMA of the LoRA, which train.ema_decay"),
])
def test_bad_ema_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        job(*overrides)
    assert job("train.ema_decay=0.999", "validation.use_ema=true").train.ema_decay == 0.999
    assert job().train.ema_decay is None  # off by default
