"""A quantised frozen base, LoRA trained on top: int8/int4/int2/fp8 with optimum-quanto, nf4 with bitsandbytes.

Layers that must stay in full precision for SD3 stay out, as SimpleTuner does: norms (the AdaLN modulation
linears `norm1.linear` included), proj_out, pos_embed, context_embedder and time_text_embed (sensitive: they set
the scale of every block's input). Both back ends quantise exactly the linears `quantised_linear` names.

nf4 (4-bit NormalFloat, QLoRA's format) stores each weight in 4 bits with an absmax scale per block of 64 weights;
with double quantisation (on here, as QLoRA) those fp32 scales are themselves stored in 8 bits with an fp32 scale
per 256 blocks. Each forward dequantises one layer's weight at a time into the compute dtype. bitsandbytes
quantises on CUDA (its 0.50 CPU back end works too, which the tests use; training refuses nf4 without CUDA).
"""

from __future__ import annotations

from fnmatch import fnmatch
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

KEEP_FULL_PRECISION = ["*norm*", "proj_out", "norm_out*", "pos_embed*", "context_embedder", "time_text_embed*"]
NF4_BLOCKSIZE = 64  # weights per absmax scale (bitsandbytes' 4-bit default)
BNB_INSTALL = "pip install bitsandbytes (or pip install 'raytune_sd3[lowvram]')"
NF4_NEEDS_CUDA = ("model.quantize nf4 needs bitsandbytes on an NVIDIA GPU (CUDA), and this job would train "
                  "without one: use model.quantize: int4 (optimum-quanto, runs anywhere, about the same size) or "
                  "train on a CUDA GPU")


def quantised_linear(name: str) -> bool:
    """Whether the module called `name` (diffusers' dotted name) is quantised, were it a Linear."""
    return not any(fnmatch(name, pattern) for pattern in KEEP_FULL_PRECISION)


def quantize_transformer(transformer: nn.Module, kind: str, device=None) -> nn.Module:
    """Quantise the weights of `transformer` in place and freeze them; returns it.

    `kind`: model.quantize. quanto kinds quantise where the weights are; nf4 quantises each linear onto `device`
    (default: where it is) one at a time, so the full-precision copy is never on the GPU whole.
    """
    if kind == "none":
        return transformer
    if kind == "nf4":
        return quantize_nf4(transformer, device)
    from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize
    from optimum.quanto.nn import QLinear

    weights = {"int8": qint8, "int4": qint4, "int2": qint2, "fp8": qfloat8}[kind]
    quantize(transformer, weights=weights, exclude=KEEP_FULL_PRECISION)
    freeze(transformer)
    for module in transformer.modules():
        if isinstance(module, QLinear):
            module.forward = MethodType(_frozen_quanto_forward, module)
    return transformer.requires_grad_(False)


class _FrozenQuantoLinear(torch.autograd.Function):
    """quanto's linear for a frozen weight: the same forward and input gradient as quanto's own function
    (`QuantizedLinearFunction`), without keeping the layer's input for backward, which only a weight gradient
    needs. quanto keeps it regardless: an activation-sized tensor per quantised linear and step (a third more
    activations for an SD3.5 LoRA, more than the int8 weights save at 1024 px, batch 2)."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.weight = weight  # the frozen quantised weight: a reference, not a copy
        return F.linear(input, weight, bias)  # quanto's path; no graph is recorded inside a Function's forward

    @staticmethod
    def backward(ctx, grad_output):
        return torch.matmul(grad_output, ctx.weight), None, None  # as quanto's backward computes it


def _frozen_quanto_forward(self, input: torch.Tensor) -> torch.Tensor:
    device = input.device.type
    if torch.is_autocast_enabled(device):
        # quanto's kernels are outside autocast's op lists: cast the input as autocast casts an nn.Linear's, or an
        # fp32 LayerNorm output (what CUDA's autocast makes) would run the matmul in fp32, or fail in int4's kernel
        input = input.to(torch.get_autocast_dtype(device))
    if torch.is_grad_enabled() and not self.qweight.requires_grad:
        return _FrozenQuantoLinear.apply(input, self.qweight, self.bias)
    return F.linear(input, self.qweight, bias=self.bias)


def bitsandbytes_module(what: str):
    """bitsandbytes, or a RuntimeError naming `what` needs it and the pip command."""
    try:
        import bitsandbytes
    except ImportError:
        raise RuntimeError(f"{what} needs bitsandbytes, which is not installed: {BNB_INSTALL}") from None
    return bitsandbytes


def quantize_nf4(transformer: nn.Module, device=None) -> nn.Module:
    """Replace each quantisable nn.Linear by a bitsandbytes Linear4bit (nf4, double quantisation) on `device`,
    computing in the layer's own dtype; marks the model 4-bit so peft puts its LoRA layers on them."""
    bnb = bitsandbytes_module("model.quantize nf4")
    for name, module in list(transformer.named_modules()):
        if type(module) is not nn.Linear or not quantised_linear(name):
            continue
        target = device if device is not None else module.weight.device
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=module.weight.dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                     compress_statistics=True, quant_type="nf4", module=q)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        transformer.set_submodule(name, q.to(target))  # .to() quantises; the full-precision weight is dropped
    transformer.is_loaded_in_4bit = True  # peft reads it to wrap Linear4bit layers with its 4-bit LoRA layer
    return transformer.requires_grad_(False)
