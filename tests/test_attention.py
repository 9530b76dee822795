"""Attention kernels (train/attention.py): train.attention's choice of torch's kernels, and the router that sends
the sampler's attention to another kernel (validation.attention sage), checked on the tiny transformer."""

import contextlib
import math
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raytune_sd3.config import ConfigError, load_job
from raytune_sd3.driver.preflight import check_paths
from raytune_sd3.models.loading import load_transformer
from raytune_sd3.train.attention import RouteAttention, attention_kernel, sage_available, sampling_attention
from tests.conftest import ROOT


def test_train_attention_picks_the_kernel():
    """train.attention math runs torch's reference attention where auto lets torch pick its fused CPU kernel (on
    GPUs: flash, cudnn or efficient by name); seen in the ops the call dispatches."""

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, 2, 8, 16)
    seen = {}
    for name in ("auto", "math"):
        with attention_kernel(name)(), Ops() as ops:
            seen[name] = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        seen[name + "_ops"] = ops.names
    assert any("flash_attention" in n for n in seen["auto_ops"])
    assert not any("flash_attention" in n for n in seen["math_ops"]) and "bmm.default" in seen["math_ops"]
    torch.testing.assert_close(seen["math"], seen["auto"], rtol=1e-5, atol=1e-6)


def test_routed_attention_is_every_call_of_the_transformer_with_its_layout_and_scale(tiny_sd3):
    """RouteAttention hands each of the transformer's attention calls to another kernel: here attention written out
    (softmax(q k^T * scale) v). The forward equals torch's, so q, k, v and the scale arrived as SDPA has them,
    and every block's call was routed (one joint attention per block)."""
    model = load_transformer(tiny_sd3).eval()
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([500.0]),
             encoder_hidden_states=torch.randn(1, 154, model.config.joint_attention_dim, generator=g),
             pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g), return_dict=False)
    seen = []

    def written_out(q, k, v, scale):
        seen.append((q.shape, scale))
        weights = (q @ k.transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
        return weights.softmax(-1) @ v

    with torch.no_grad():
        reference = model(**x)[0]
        with RouteAttention(written_out) as routed:
            out = model(**x)[0]
    assert routed.calls == len(seen) == len(model.transformer_blocks)
    assert all(len(shape) == 4 and shape[1] == model.config.num_attention_heads for shape, _ in seen)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    with RouteAttention(lambda q, k, v, scale: torch.zeros_like(q)):  # and the output depends on it
        with torch.no_grad():
            assert not torch.allclose(model(**x)[0], reference)


@pytest.mark.skipif(sage_available(), reason="sageattention is installed here")
def test_sage_without_its_package_stops_before_ray(tmp_path):
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path}", "validation.attention=sage"])
    with pytest.raises(ConfigError, match=r"validation.attention sage: the sageattention package is not installed"
                                          r".*pip install sageattention"):
        check_paths(cfg)
    check_paths(load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path}", "validation.attention=sage",
                                                        "validation.prompts=[]"]))  # no sampling: nothing to refuse
    with pytest.raises(RuntimeError, match="not installed"):  # and the worker says so too
        sampling_attention("sage", torch.device("cpu"))
    assert isinstance(sampling_attention("auto", torch.device("cpu")), contextlib.nullcontext)


def _sage_stand_in(calls: list):
    """A module standing in for the sageattention package: `sageattn` with its documented signature and layouts
    (HND: batch, heads, tokens, head_dim; NHD: batch, tokens, heads, head_dim), 16-bit inputs only, scale
    1/sqrt(head_dim) unless sm_scale is given, and an fp16 result (attention written out in fp32)."""
    import importlib.machinery
    import types

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False):
        calls.append({"layout": tensor_layout, "causal": is_causal, "scale": sm_scale})
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        if tensor_layout == "NHD":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
        out = ((q.float() @ k.float().transpose(-1, -2)) * scale).softmax(-1) @ v.float()
        return (out.transpose(1, 2) if tensor_layout == "NHD" else out).to(torch.float16)

    module = types.ModuleType("sageattention")
    module.sageattn = sageattn
    module.__spec__ = importlib.machinery.ModuleSpec("sageattention", None)
    return module


def test_the_sage_adapter_gives_sageattn_sdpas_layout_and_scale_and_returns_sdpas_dtype(monkeypatch):
    """validation.attention sage (sageattention is not installed here): with a stand-in `sageattn`, what the
    adapter makes of scaled_dot_product_attention calls equals torch's SDPA, with the default scale and a given
    one, for queries and keys of different lengths (so heads and tokens cannot be swapped unnoticed); the result
    has the caller's dtype; a masked call is left to torch."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "sageattention", _sage_stand_in(calls))
    assert sage_available()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=g).to(torch.bfloat16)  # batch, heads, query tokens, head_dim
    k, v = (torch.randn(2, 3, 7, 8, generator=g).to(torch.bfloat16) for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="CUDA GPUs only"):
        sampling_attention("sage", torch.device("cpu"))
    for scale in (None, 0.3):
        expected = sdpa(q.float(), k.float(), v.float(), scale=scale)
        with sampling_attention("sage", torch.device("cuda")) as routed:  # the device is only checked, not used
            out = sdpa(q, k, v) if scale is None else sdpa(q, k, v, scale=scale)
            mask = torch.ones(5, 7, dtype=torch.bool)
            masked = sdpa(q, k, v, attn_mask=mask, scale=scale)
        assert routed.calls == 1 and calls[-1] == {"layout": "HND", "causal": False, "scale": scale}
        assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 5, 8)
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=1e-2)
        torch.testing.assert_close(masked.float(), expected, rtol=2e-2, atol=2e-2)  # torch's own, all-true mask
    assert len(calls) == 2
