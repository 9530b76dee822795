"""Quantised frozen base with optimum-quanto: int8/int4/int2 (or fp8) weights, LoRA trained on top.

Layers that must stay in full precision for SD3 stay out, as SimpleTuner does: norms, proj_out, pos_embed,
context_embedder and time_text_embed (small, and sensitive: they set the scale of every block's input).
"""

from __future__ import annotations

from torch import nn

KEEP_FULL_PRECISION = ["*norm*", "proj_out", "norm_out*", "pos_embed*", "context_embedder", "time_text_embed*"]


def quantize_transformer(transformer: nn.Module, kind: str) -> nn.Module:
    """Quantise the weights of `transformer` in place (then freeze them into quantised tensors); returns it."""
    if kind == "none":
        return transformer
    from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

    weights = {"int8": qint8, "int4": qint4, "int2": qint2, "fp8": qfloat8}[kind]
    quantize(transformer, weights=weights, exclude=KEEP_FULL_PRECISION)
    freeze(transformer)
    return transformer.requires_grad_(False)
