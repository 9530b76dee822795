"""An exponential moving average (EMA) of the LoRA weights, kept in fp32 beside the trained ones (train.ema_decay).

After each applied optimizer step, with n the number of updates before it:

    d_n = min(decay, (1 + n) / (10 + n))          warm-up: 0.1, 0.18, 0.25, ... up to `decay`
    ema = d_n * ema + (1 - d_n) * weights

The warm-up is diffusers' EMAModel's default (its `use_ema_warmup=False` branch), so the early average follows the
weights instead of staying near the random init for ~1/(1 - decay) steps. A skipped (non-finite) step leaves the
weights untouched and is not an update. Every rank holds the same weights after a step (DDP all-reduces the
gradients; ZeRO-2 all-gathers the updated weights), so every rank's EMA is the same without communication.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raytune_sd3.run_layout import CHECKPOINT_RAW_EMA

EMA_RAW = CHECKPOINT_RAW_EMA  # in a checkpoint: the EMA by parameter name, fp32, for resuming


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of the update after `updates` earlier ones (see the module docstring)."""
    return min(decay, (1 + updates) / (10 + updates))


class LoraEma:
    """fp32 EMA of a module's trainable parameters, by name (`named_parameters` names, peft's wrapper included)."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the module's current weights."""
        weight = 1.0 - ema_decay_at(self.decay, self.updates)
        # ema + w * (p - ema) = d * ema + (1 - d) * p, for every tensor in one fused call (a step's hot path: one
        # kernel per parameter would launch hundreds on a GPU)
        torch._foreach_lerp_([self.shadow[name] for name in self.params],
                             [p.detach().float() for p in self.params.values()], weight)
        self.updates += 1

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The EMA as the adapter's tensors (the names strategy.lora_tensors() gives), fp32 CPU copies."""
        from raytune_sd3.models.lora import adapter_tensors

        return adapter_tensors(self.module, {name: t.detach().cpu() for name, t in self.shadow.items()})

    def save(self, folder: Path) -> None:
        save_file({name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}, str(folder / EMA_RAW),
                  metadata={"updates": str(self.updates), "decay": repr(self.decay)})

    def load(self, folder: Path) -> None:
        """Restore what save() wrote; a checkpoint written without EMA (the option turned on at a resume) starts it
        from the resumed weights."""
        from safetensors import safe_open

        path = folder / EMA_RAW
        if not path.exists():
            self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}
            self.updates = 0
            return
        saved = load_file(str(path))
        if set(saved) != set(self.shadow):
            raise RuntimeError(f"checkpoint {folder}: its EMA has other LoRA parameters than the model "
                               "(lora settings changed since it was written); resume with the same lora settings")
        with safe_open(str(path), "pt") as f:
            self.updates = int(f.metadata()["updates"])
        device = next(iter(self.shadow.values())).device
        self.shadow = {name: t.to(device, torch.float32) for name, t in saved.items()}

    @contextlib.contextmanager
    def swapped_in(self):
        """Within it, the module's LoRA weights are the EMA's (cast to their dtype); the trained ones after (a
        second copy of the LoRA is held meanwhile)."""
        with torch.no_grad():
            kept = {name: p.detach().clone() for name, p in self.params.items()}
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(kept[name])
