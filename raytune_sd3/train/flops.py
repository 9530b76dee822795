"""Training FLOPs of a LoRA step and MFU, shared by the loop's metrics and benchmarks/gpu.py.

F_fwd is what torch's FlopCounterMode counts over one forward pass (matmuls, convolutions, attention). It splits
into F_l per layer with a weight and F_attn, the rest (attention's matmuls). A layer's backward costs F_l for its
input gradient (only if its input needs one) plus F_l for its weight gradient (only if the weight trains, i.e.
LoRA's A and B); attention's backward costs 2 F_attn:

    F_train = sum_l F_l * (1 + [input of l needs a gradient] + [weight of l is trained]) + 3 F_attn

Recomputation (flash attention's backward, gradient checkpointing) is not counted: MFU counts the model's FLOPs.
MFU = F_train per step / step time / the card's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from raytune_sd3.hardware import peak_tflops_of


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The card's dense bf16 peak (TFLOP/s): `override`, else from the CUDA device's name (hardware.py); None when
    unknown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


@dataclass
class FlopCount:
    """A forward pass's FLOPs (FlopCounterMode): per weight layer (flops, input needs grad, weight trained) + rest."""

    forward: int
    layers: dict[str, tuple[int, bool, bool]]

    @property
    def attention(self) -> int:
        return self.forward - sum(f for f, _, _ in self.layers.values())

    def training(self) -> int:
        """F_train = sum_l F_l (1 + [input needs grad] + [weight trained]) + 3 F_attn (see the module docstring)."""
        return sum(f * (1 + in_grad + w_grad) for f, in_grad, w_grad in self.layers.values()) + 3 * self.attention

    def breakdown(self) -> dict[str, int]:
        """Forward FLOPs by kind: LoRA layers, frozen layers behind a LoRA, frozen layers on data, attention."""
        out = {"lora": 0, "frozen, input needs grad": 0, "frozen, on data": 0}
        for f, in_grad, w_grad in self.layers.values():
            out["lora" if w_grad else "frozen, input needs grad" if in_grad else "frozen, on data"] += f
        return {**out, "attention": self.attention}


def countable_attention(device: torch.device):
    """FlopCounterMode has no formula for the CPU's fused attention kernel: count the math path's matmuls there."""
    if device.type == "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def count_flops(model: nn.Module, run, device: torch.device | str = "cpu") -> FlopCount:
    """FlopCounterMode over `run()` (a forward pass of `model`, with autograd on), split per weight layer."""
    device = torch.device(device)
    flags: dict[str, list[bool]] = {}

    def note(name):
        def hook(module, inputs):
            x = inputs[0] if inputs else None
            f = flags.setdefault(name, [False, False])
            f[0] |= torch.is_tensor(x) and x.requires_grad
            f[1] |= module.weight.requires_grad
        return hook

    hooks = [m.register_forward_pre_hook(note(name)) for name, m in model.named_modules()
             if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    try:
        with countable_attention(device), FlopCounterMode(display=False) as counter:
            run()
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    layers = {name: (sum(counts.get(f"{root}.{name}" if name else root, {}).values()), *f)
              for name, f in flags.items()}
    return FlopCount(counter.get_total_flops(), layers)
