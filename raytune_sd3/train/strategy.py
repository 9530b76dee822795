"""How the LoRA's gradients are reduced and the optimizer stepped across workers: DDP (default) or DeepSpeed.

The loop calls the same five things whatever the strategy:
    model(...)                     forward (the wrapped model)
    accumulating(sync)             context for a micro-step (no gradient all-reduce until the last one)
    backward(loss)
    step(loss_finite) -> (norm, stepped)   clip, then step unless the loss or the gradient is not finite
    lora_tensors()                 peft's LoRA tensors, complete on rank 0 (gathered under ZeRO-3)
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from raytune_sd3.config import JobConfig


def clip_gradients(params: list[nn.Parameter], cfg: JobConfig) -> torch.Tensor:
    """Clip by global norm (default) or by value; returns the global gradient norm before clipping."""
    t = cfg.train
    if t.grad_clip == "norm":
        return torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)
    norm = torch.nn.utils.clip_grad_norm_(params, math.inf)
    if t.max_grad_norm:
        torch.nn.utils.clip_grad_value_(params, t.max_grad_norm)
    return norm


class DDPStrategy:
    """torch DDP over the trainable (LoRA) parameters; the frozen base is replicated on every worker."""

    name = "ddp"
    sharded_optimizer = False  # every rank holds the same optimizer state: rank 0 saves it, all load it

    def __init__(self, transformer: nn.Module, params: list[nn.Parameter], optimizer, cfg: JobConfig, world: int):
        import ray.train.torch

        self.module, self.params, self.optimizer, self.cfg = transformer, params, optimizer, cfg
        self.model = ray.train.torch.prepare_model(transformer, parallel_strategy="ddp" if world > 1 else None)
        self.world = world

    def accumulating(self, sync: bool):
        return contextlib.nullcontext() if sync or self.world == 1 else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss_finite: bool) -> tuple[float, bool]:
        norm = float(clip_gradients(self.params, self.cfg))  # identical on every rank after the all-reduce
        stepped = loss_finite and math.isfinite(norm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.module).items()}

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def make_strategy(transformer: nn.Module, params: list[nn.Parameter], optimizer, cfg: JobConfig, world: int):
    return DDPStrategy(transformer, params, optimizer, cfg, world)
