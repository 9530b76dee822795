"""The train loop's WorkerRun on one process without Ray, for tests of real steps (train_step) on the tiny model:
set up as _setup_model does on one worker, with micro-batches of random latents and embeddings."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from raytune_sd3.models.loading import load_transformer
from raytune_sd3.models.lora import add_lora
from raytune_sd3.train.checkpoint import load_checkpoint
from raytune_sd3.train.ema import LoraEma
from raytune_sd3.train.loop import WorkerRun, make_lr_schedule
from raytune_sd3.train.optim import make_optimizer
from raytune_sd3.train.strategy import DDPStrategy


class Batches:
    """Micro-batches as the cache reader gives them (random latents and embeddings of the tiny model's shapes, fixed
    by the step), with their sigmas, noise (and rollout lengths) drawn by the loop's own _with_noise."""

    def __init__(self, run: WorkerRun, first_step: int, size: int = 2):
        self.run, self.step, self.size = run, first_step, size

    def get(self) -> dict:
        g, n = torch.Generator().manual_seed(self.step), self.size
        batch = {"latents": torch.randn(n, 16, 8, 8, generator=g), "prompt_embeds": torch.randn(n, 12, 96, generator=g),
                 "pooled": torch.randn(n, 80, generator=g), "loss_weight": torch.ones(n)}
        self.step += 1
        return self.run._with_noise((self.step - 2, 0), batch)


def tiny_run(pretrained: str, cfg, resume_from: Path | None = None, batch: int = 2) -> WorkerRun:
    """A WorkerRun as _setup_model sets one up on one worker (its Ray parts left out): tiny transformer + LoRA,
    optimizer, LR schedule, the EMA where the job keeps one, and a checkpoint to resume from."""
    run = WorkerRun.__new__(WorkerRun)  # its __init__ needs Ray Train's context
    run.cfg, run.t, run.rank, run.world, run.accum = cfg, cfg.train, 0, 1, 1
    run.device, run.dtype, run.peak, run.nonfinite = torch.device("cpu"), torch.float32, None, 0
    run.flops_of_shape = {}
    run.autocast, run.attention = contextlib.nullcontext(), contextlib.nullcontext
    run.reader = type("Reader", (), {"steps_per_epoch": 10})()
    transformer = load_transformer(pretrained)
    params = add_lora(transformer, cfg.lora, seed=cfg.train.seed)
    run.optimizer = optimizer = make_optimizer(params, cfg.train)
    run.lr_schedule = make_lr_schedule(optimizer, cfg)
    run.start_step = 0
    if resume_from is not None:
        run.start_step, _ = load_checkpoint(resume_from, transformer, run.lr_schedule)
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", weights_only=True))
    run.ema = LoraEma(transformer, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if resume_from is not None and run.ema is not None:
        run.ema.load(resume_from)
    strategy = DDPStrategy.__new__(DDPStrategy)  # world 1: no DDP wrapper
    strategy.transformer = strategy.wrapped = transformer.train()
    strategy.params, strategy.optimizer, strategy.cfg, strategy.world = params, optimizer, cfg, 1
    run.strategy, run.batches = strategy, Batches(run, run.start_step + 1, batch)
    return run
