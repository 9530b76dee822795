"""The peak tensor memory of one real LoRA training step, to check raytune_sd3/memory.py's estimate against.

`trace_peak` builds diffusers' SD3Transformer2DModel from a config (random weights), adds our LoRA and runs a step
as train/loop.py does (forward, flow loss, backward, clip, AdamW), tracking every tensor storage it makes. On the
"meta" device nothing is computed (seconds, any model size: SD3.5 Large included) and attention is routed to the
flash kernel real runs use; on "cpu" or "cuda" it is a real run. tests/test_check.py and memory.py here use it.

With `mixed_precision="bf16"` the step runs as the loop runs it on a GPU by default: under bf16 autocast with
peft's input casts off (models.lora.LoraAutocast). Autocast does not run on meta, and CPU autocast runs other ops
in fp32 than CUDA's (CUDA keeps layer_norm, pow, sum and more in fp32), so on "cpu" `cuda_autocast_policy` gives
CPU autocast CUDA's policy: the bytes that step keeps are those a GPU's would keep.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from raytune_sd3.memory import TEXT_CLIP_TOKENS
from raytune_sd3.train.attention import RouteAttention


def trace_peak(config: dict, *, dtype: str, targets: str | list[str], rank: int, batch: int, resolution: int,
               t5_tokens: int, device: str = "meta", blocks: list[int] | None = None,
               mixed_precision: str = "no", quantization: str = "none") -> dict[str, int]:
    """Run one LoRA training step as train/loop.py does (random weights) and return its tensor memory in bytes.

    Keys: `static` (weights + LoRA + AdamW state), `forward` (after the loss), `peak` (a whole step after the first).
    "meta" computes nothing (any model size, seconds) and routes attention to the flash kernel PyTorch uses on
    CPU and GPU; "cpu" runs the real step; "cuda" also reports `cuda_max_allocated`. `mixed_precision` "bf16":
    under the loop's bf16 autocast, on "cpu" (with CUDA's autocast policy) or "cuda". `quantization`: the base
    quantised as model.quantize does it, before the LoRA (quanto kinds on any device).
    """
    from diffusers import SD3Transformer2DModel

    from raytune_sd3.config import FlowConfig, LoraConfig
    from raytune_sd3.flow import flow_loss, noisy_input
    from raytune_sd3.models.loading import DTYPES
    from raytune_sd3.models.lora import add_lora

    if mixed_precision == "bf16" and device == "meta":
        raise ValueError("autocast does not run on the meta device: trace mixed precision on cpu or cuda")

    torch_dtype = DTYPES[dtype]
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)  # build in dtype: meta tensors cannot be cast with .to() afterwards
        try:
            model = SD3Transformer2DModel.from_config(config)
        finally:
            torch.set_default_dtype(previous)
        model.requires_grad_(False)
        if quantization != "none":  # as the loop does: quantise the base, then add the LoRA
            from raytune_sd3.models.quantize import quantize_transformer

            quantize_transformer(model, quantization)
        params = add_lora(model, LoraConfig(rank=rank, targets=targets, blocks=blocks))
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        h = w = resolution // 8
        latents = torch.randn(batch, config.get("in_channels", 16), h, w, dtype=torch_dtype)
        embeds = torch.randn(batch, TEXT_CLIP_TOKENS + t5_tokens, config["joint_attention_dim"], dtype=torch_dtype)
        pooled = torch.randn(batch, config["pooled_projection_dim"], dtype=torch_dtype)
        noise, sigmas = torch.randn_like(latents), torch.rand(batch)
        # AdamW makes its state in the first step, after that step's backward: make it now, so that the peak
        # measured is that of every later step (the state held through the backward).
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tracker = PeakTensorMemory()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for t in [*model.parameters(), *model.buffers(), *state]:
        tracker.track(t)
    static = tracker.live
    for t in (latents, embeds, pooled, noise, sigmas):
        tracker.track(t)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    flash = RouteAttention(flash_on_meta) if device == "meta" else contextlib.nullcontext()
    autocast = loop_autocast(model, device) if mixed_precision == "bf16" else contextlib.nullcontext()
    with tracker, flash, autocast:
        pred = model(hidden_states=noisy_input(latents, noise, sigmas), timestep=sigmas * 1000,
                     encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        loss = flow_loss(FlowConfig(), pred, latents, noise, sigmas).mean()
        forward = tracker.live
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out = {"static": static, "forward": forward, "peak": tracker.peak}
    if device.startswith("cuda"):
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


@contextlib.contextmanager
def loop_autocast(model, device: str):
    """The loop's bf16 autocast (LoraAutocast), with CUDA's policy on a CPU."""
    from raytune_sd3.models.lora import LoraAutocast

    with cuda_autocast_policy() if device == "cpu" else contextlib.nullcontext():
        with LoraAutocast(model, torch.device(device).type):
            yield


def two_blocks(hub_id: str) -> dict:
    """The transformer config of a hub model (models/catalogue.py) cut to its first 2 blocks, at full width:
    a real step of it runs on a CPU in seconds."""
    from raytune_sd3.models.catalogue import KNOWN_TRANSFORMERS

    config = dict(KNOWN_TRANSFORMERS[hub_id], num_layers=2)
    config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < 2]
    return config


def flash_on_meta(q, k, v, scale):
    """On meta tensors SDPA falls back to the math kernel (which keeps the S x S matrix); real runs use flash."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[0]


# CUDA's autocast policy where CPU's differs, for the ops a training step can reach (ATen's autocast_mode.cpp):
# ops CUDA runs in fp32 (CPU's list keeps only losses and linear algebra there), and reductions whose output CUDA
# makes fp32 when no dtype is given. Both run linear, conv, matmul and attention in the low precision.
CUDA_FP32_OPS = ("layer_norm", "native_layer_norm", "group_norm", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "rsqrt",
                 "exp", "expm1", "log", "log1p", "reciprocal", "softplus", "logsumexp")
CUDA_FP32_OUTPUT_OPS = ("sum", "sum.dim_IntList", "softmax.int", "log_softmax.int", "cumsum", "prod",
                        "linalg_vector_norm")


@contextlib.contextmanager
def cuda_autocast_policy():
    """Inside it, CPU autocast casts as CUDA's does (kernels at the AutocastCPU key, above autograd, so the
    casts are recorded and what autograd saves is what it saves on a GPU)."""
    lib = torch.library.Library("aten", "IMPL")
    below_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def fp32(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
            return x.float()
        return type(x)(fp32(i) for i in x) if isinstance(x, list | tuple) else x

    def op_of(name: str):
        base, _, overload = name.partition(".")
        return getattr(getattr(torch.ops.aten, base), overload or "default")

    def in_fp32(_op):
        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(below_autocast):
                return _op(*fp32(args), **{k: fp32(v) for k, v in kwargs.items()})
        return kernel

    def with_fp32_output(_op):
        at = next(i for i, a in enumerate(_op._schema.arguments) if a.name == "dtype")  # positional or keyword

        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(below_autocast):
                x = args[0]
                if x.is_floating_point() and x.dtype != torch.float64:
                    if len(args) > at:
                        args = (*args[:at], args[at] or torch.float32, *args[at + 1:])
                    elif kwargs.get("dtype") is None:
                        kwargs["dtype"] = torch.float32
                return _op(*args, **kwargs)
        return kernel

    with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        for name in CUDA_FP32_OPS:
            lib.impl(name, in_fp32(op_of(name)), "AutocastCPU")
        for name in CUDA_FP32_OUTPUT_OPS:
            lib.impl(name, with_fp32_output(op_of(name)), "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


class PeakTensorMemory(TorchDispatchMode):
    """Live bytes of every tensor storage made inside it (or handed to `track`), and their peak: what
    torch.cuda.max_memory_allocated reports, less the caching allocator's rounding."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def track(self, t) -> None:
        if is_traceable_wrapper_subclass(t):  # e.g. quanto's quantised weights: the bytes are in their inner tensors
            for name in t.__tensor_flatten__()[0]:
                self.track(getattr(t, name))
            return
        st = t.untyped_storage()
        if st in self._seen:
            return
        nbytes = st.nbytes()
        self._seen[st] = weakref.ref(st, lambda _, n=nbytes: self._freed(n))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out
