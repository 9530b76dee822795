"""Which attention kernel the transformer's forwards run: train.attention for training and eval, and
validation.attention for sampling (SageAttention, SimpleTuner's faster sampler attention, where it is installed).

diffusers' SD3 attention calls torch's scaled_dot_product_attention; torch picks among its kernels (flash, cuDNN,
memory-efficient, math) unless told (`sdpa_kernel`), and an outside kernel is swapped in by routing that call.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SAGE_FIX = "pip install sageattention on the GPU nodes, or set validation.attention: auto"


def attention_kernel(name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of contexts that run scaled_dot_product_attention with train.attention's kernel (auto: torch's
    choice)."""
    if name == "auto":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return lambda: sdpa_kernel([backend])


class RouteAttention(TorchFunctionMode):
    """Send every scaled_dot_product_attention call without a mask or dropout to `kernel(q, k, v, scale)` (q, k, v
    as (batch, heads, tokens, head_dim)); any other call runs as it would."""

    def __init__(self, kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None], torch.Tensor]):
        super().__init__()
        self.kernel, self.calls = kernel, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and kwargs.get("attn_mask") is None and (
                not kwargs.get("dropout_p") and not kwargs.get("is_causal") and not kwargs.get("enable_gqa")):
            self.calls += 1
            return self.kernel(*args, kwargs.get("scale"))
        return func(*args, **kwargs)


def sage_available() -> bool:
    return importlib.util.find_spec("sageattention") is not None


def sampling_attention(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context validation sampling runs in: validation.attention sage routes attention to SageAttention's
    kernel (CUDA, fp16/bf16 inputs: the sampler's are bf16 on GPUs), auto leaves torch's choice."""
    if name == "auto":
        return contextlib.nullcontext()
    if not sage_available():
        raise RuntimeError(f"validation.attention sage: the sageattention package is not installed here: {SAGE_FIX}")
    if device.type != "cuda":
        raise RuntimeError(f"validation.attention sage runs on CUDA GPUs only, and this worker has {device}: "
                           "set validation.attention: auto")
    from sageattention import sageattn

    def sage(q, k, v, scale):
        out = sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)
        return out.to(q.dtype)

    return RouteAttention(sage)
