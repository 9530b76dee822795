"""A quanto-quantised base: the right layers quantised, output close to the full-precision one, LoRA trains on top
and its file loads into an unquantised pipeline with every key matched."""

import fnmatch
from pathlib import Path

import pytest
import torch
from optimum.quanto.nn import QLinear
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from raytune_sd3.config import LoraConfig
from raytune_sd3.models.loading import load_transformer
from raytune_sd3.models.lora import add_lora, export_lora, lora_state_dict
from raytune_sd3.models.quantize import KEEP_FULL_PRECISION, quantize_transformer

ROOT = Path(__file__).resolve().parents[1]


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, 16, 8, 8, generator=g), "timestep": torch.tensor([300.0, 800.0]),
            "encoder_hidden_states": torch.randn(2, 154, 96, generator=g),
            "pooled_projections": torch.randn(2, 80, generator=g), "return_dict": False}


@pytest.mark.parametrize("kind,max_rel_err", [("int8", 0.01), ("int4", 0.05)])
def test_quantised_base_trains_a_lora(tiny_sd3, tmp_path, kind, max_rel_err):
    full = load_transformer(tiny_sd3)
    with torch.no_grad():
        ref = full(**_inputs())[0]
    model = quantize_transformer(load_transformer(tiny_sd3), kind)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            keep = any(fnmatch.fnmatch(name, p) for p in KEEP_FULL_PRECISION)
            assert isinstance(module, QLinear) != keep, name
    assert isinstance(model.transformer_blocks[0].attn.to_q, QLinear)
    assert not isinstance(model.proj_out, QLinear) and not isinstance(model.context_embedder, QLinear)
    with torch.no_grad():
        out = model(**_inputs())[0]
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < max_rel_err  # quantised (not identical), and close

    cfg = LoraConfig(rank=4, targets="attention")
    params = add_lora(model, cfg)
    assert all(p.dtype == torch.float32 for p in params) and all(not p.requires_grad for p in model.parameters()
                                                                  if not any(p is q for q in params))
    _assert_trains(model, params)

    export_lora(tmp_path, lora_state_dict(model), cfg)
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(tmp_path)
    n_lora = sum(1 for k in pipe.transformer.state_dict() if "lora_" in k)
    assert n_lora == len(lora_state_dict(model)) == 2 * 2 * 4  # A and B x 2 blocks x 4 attention layers


def _assert_trains(model, params) -> None:
    """8 AdamW steps on the LoRA towards a zero output lower the loss by at least 3%."""
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = (model(**_inputs())[0] ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0]


def _saved_bytes_and_grads(model, params) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the tensors autograd keeps for backward (weights aside), and the LoRA gradients, of one step."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters() if not hasattr(p, "__tensor_flatten__")}
    kept: dict[int, int] = {}

    def pack(t):
        if not hasattr(t, "__tensor_flatten__") and t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (model(**_inputs())[0] ** 2).mean()
    loss.backward()
    return sum(kept.values()), [p.grad.clone() for p in params]


def test_quanto_linears_keep_no_input_and_give_quantos_gradients(tiny_sd3):
    """quanto's own linear keeps its input for a weight gradient a frozen base never takes; ours keeps none: a
    step keeps what it keeps on the unquantised base, with the LoRA gradients of quanto's path bit for bit."""
    from optimum.quanto.nn import QLinear

    lora = LoraConfig(rank=4, targets="attention")
    full = load_transformer(tiny_sd3)
    full_bytes, _ = _saved_bytes_and_grads(full, add_lora(full, lora))
    ours = quantize_transformer(load_transformer(tiny_sd3), "int8")
    ours_bytes, ours_grads = _saved_bytes_and_grads(ours, add_lora(ours, lora))
    quantos = quantize_transformer(load_transformer(tiny_sd3), "int8")
    for module in quantos.modules():
        if isinstance(module, QLinear):
            del module.forward  # back to QLinear.forward: quanto's QuantizedLinearFunction
    quantos_bytes, quantos_grads = _saved_bytes_and_grads(quantos, add_lora(quantos, lora))
    assert ours_bytes == full_bytes < quantos_bytes
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, quantos_grads, strict=True))

class _MatmulInputs(TorchDispatchMode):
    """The dtypes of the tensors each quanto or torch matmul is given."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[list[torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("qbytes_mm", "mm", "addmm", "linear"):
            self.dtypes.append([a.dtype for a in args if isinstance(a, torch.Tensor)])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True], ids=["eval", "training"])
def test_quanto_linear_under_autocast_casts_its_input_as_autocast_casts_a_linears(grad):
    """autocast does not know quanto's matmul: given an fp32 input (an fp32 LayerNorm's output, as CUDA's autocast
    makes) it would run int8's matmul on fp32 activations. Ours casts the input to autocast's dtype first: the
    matmul sees bf16 and the output is bit for bit the layer's on a bf16 input, in eval and in the training path
    (our autograd Function)."""
    torch.manual_seed(0)
    holder = quantize_transformer(nn.Sequential(nn.Linear(64, 96)).to(torch.bfloat16), "int8")
    layer = holder[0]
    x = torch.randn(3, 64)
    with torch.set_grad_enabled(grad):
        expected = layer(x.to(torch.bfloat16).requires_grad_(grad))
        with torch.autocast("cpu", dtype=torch.bfloat16), _MatmulInputs() as seen:
            out = layer(x.clone().requires_grad_(grad))
    assert seen.dtypes and all(dtypes[0] == torch.bfloat16 for dtypes in seen.dtypes), seen.dtypes
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_a_quanto_base_trains_under_bf16_autocast_from_bf16_weights_only(tiny_sd3, tmp_path):
    """Under the loop's bf16 autocast (LoraAutocast) a quanto base trains when quantised from bf16 weights; from
    fp32 ones it fails (its matmul, or its weights refusing autocast's cast in backward), so such a job is refused
    at the door, and after `auto`s resolve, naming the keys."""
    from raytune_sd3.config import ConfigError, load_job
    from raytune_sd3.driver.placement import Cluster, resolve_auto
    from raytune_sd3.models.lora import LoraAutocast

    for dtype, trains in ((torch.bfloat16, True), (torch.float32, False)):
        model = quantize_transformer(load_transformer(tiny_sd3, dtype), "int8")
        params = add_lora(model, LoraConfig(rank=4, targets="attention"))
        inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in _inputs().items()}
        with LoraAutocast(model, "cpu"):
            if trains:
                model(**inputs)[0].float().square().mean().backward()
                assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
            else:
                with pytest.raises((RuntimeError, ValueError)):  # quanto's matmul, or its cast in backward
                    model(**inputs)[0].float().square().mean().backward()

    job = ROOT / "jobs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="model.quantize int8 with model.dtype fp32 under train.mixed_precision bf16"):
        load_job(job, ["model.dtype=fp32", "train.mixed_precision=bf16", "model.quantize=int8"])
    # DeepSpeed's engine moves the model with torch.utils.swap_tensors, which quanto's weights refuse ("Cannot
    # swap t1 because it has weakref associated with it", seen on the tiny job under zero2): refused up front.
    with pytest.raises(ConfigError, match="model.quantize fp8 with train.strategy zero3 cannot train"):
        load_job(job, ["train.strategy=zero3", "model.quantize=fp8"])
    cfg = load_job(job, [f"output_dir={tmp_path}", "train.mixed_precision=bf16", "model.quantize=int4"])
    with pytest.raises(ConfigError, match=r"model.dtype: bf16 .*\(model.dtype auto -> fp32\)"):
        resolve_auto(cfg, Cluster(({"CPU": 4.0},)))  # no GPU: model.dtype auto becomes fp32


# --- nf4 (bitsandbytes) ---------------------------------------------------------------------------------------
# bitsandbytes 0.50 quantises and runs nf4 on the CPU too: the module replacement, the format and the memory
# formula are checked here against bitsandbytes' own dequantisation; training refuses nf4 without CUDA
# (tests/test_lowvram.py).


def test_nf4_base_quantises_the_quanto_layers_and_trains_a_lora(tiny_sd3, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")  # in the dev extra; the lowvram extra for users
    full = load_transformer(tiny_sd3)
    with torch.no_grad():
        ref = full(**_inputs())[0]
    model = quantize_transformer(load_transformer(tiny_sd3), "nf4", device="cpu")
    quanto = quantize_transformer(load_transformer(tiny_sd3), "int4")
    nf4_names = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert nf4_names == {n for n, m in quanto.named_modules() if isinstance(m, QLinear)}  # the same exclusions
    assert "transformer_blocks.0.attn.to_q" in nf4_names and "transformer_blocks.0.norm1.linear" not in nf4_names
    assert {"proj_out", "context_embedder"}.isdisjoint(nf4_names)
    with torch.no_grad():
        out = model(**_inputs())[0]
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05

    cfg = LoraConfig(rank=4, targets="attention")
    params = add_lora(model, cfg)
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    assert isinstance(model.transformer_blocks[0].attn.to_q, LoraLinear4bit)  # peft's 4-bit LoRA layer
    _assert_trains(model, params)
    export_lora(tmp_path, lora_state_dict(model), cfg)
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)  # the LoRA of an nf4 base loads into a plain pipeline
    pipe.load_lora_weights(tmp_path)
    assert sum(1 for k in pipe.transformer.state_dict() if "lora_" in k) == 2 * 2 * 4


def test_nf4_layer_format_and_size_match_the_estimate():
    """One Linear: its nf4 weight is bitsandbytes' nf4 code times an absmax per block of 64, the layer's output is
    the matmul with that dequantised weight, and its storage is what memory.QUANT_BYTES['nf4'] counts."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit, get_4bit_type

    from raytune_sd3.memory import QUANT_BYTES

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(256, 512))
    w = holder[0].weight.detach().clone()
    quantize_transformer(holder, "nf4", device="cpu")
    layer = holder[0]
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.blocksize == 64
    deq = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    blocks = deq.float().reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    code = get_4bit_type("nf4", device="cpu").float()
    levels = blocks / absmax
    assert torch.allclose((levels.unsqueeze(-1) - code).abs().amin(-1), torch.zeros(()), atol=1e-6)  # on the code
    rel = ((deq - w).norm() / w.norm()).item()
    assert 0.05 < rel < 0.15  # nf4's error on Gaussian-ish weights (about 10%), not a no-op
    x = torch.randn(3, 256)
    assert torch.allclose(layer(x), nn.functional.linear(x, deq, layer.bias), atol=1e-5)

    state = layer.weight.quant_state
    stored = layer.weight.data.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes
    assert state.nested and stored == pytest.approx(w.numel() * QUANT_BYTES["nf4"], rel=0.01)

