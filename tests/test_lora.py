"""The saved LoRA loads in diffusers with every key matched and reproduces the trainer's transformer output."""

import re

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors import safe_open

from raytune_sd3.config import LoraConfig
from raytune_sd3.models.loading import compile_blocks, load_transformer
from raytune_sd3.models.lora import (
    LORA_FILE,
    PRESETS,
    LoraAutocast,
    add_lora,
    export_lora,
    lora_state_dict,
    target_modules,
)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 16, 8, 8, generator=g), "timestep": torch.tensor([300.0, 800.0]),
            "encoder_hidden_states": torch.randn(2, 77 + 77, 96, generator=g),
            "pooled_projections": torch.randn(2, 80, generator=g), "return_dict": False}


def _trained(tiny_sd3: str, cfg: LoraConfig, dtype: torch.dtype = torch.float32):
    """The tiny transformer (base in `dtype`) with a LoRA whose weights moved off their init (B != 0)."""
    transformer = load_transformer(tiny_sd3, dtype)
    params = add_lora(transformer, cfg, seed=0)
    with torch.no_grad():  # stands in for training: B != 0, so the adapter changes the output
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer


def loaded_adapter(transformer) -> dict[str, torch.Tensor]:
    """The adapter tensors of a diffusers-loaded transformer under the file's names (no adapter name)."""
    out = {}
    for k, v in transformer.state_dict().items():
        if "lora_" in k:
            k = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k)
            out["transformer." + re.sub(r"\.lora_magnitude_vector\.[^.]+\.weight$", ".lora_magnitude_vector", k)] = v
    return out


@pytest.mark.parametrize("targets,alpha,kind", [("attention", None, "lora"), ("attention+context", 8.0, "lora"),
                                                ("all", 2.0, "lora"), ("all", 3.0, "dora")])
def test_round_trip_through_load_lora_weights(tiny_sd3, tmp_path, targets, alpha, kind):
    """Also for DoRA: its magnitude vectors are saved under diffusers' names and load into a DoRA adapter."""
    cfg = LoraConfig(rank=4, alpha=alpha, targets=targets, kind=kind)
    transformer = _trained(tiny_sd3, cfg)
    with torch.no_grad():
        ours = transformer(**_inputs())[0]
    path = export_lora(tmp_path, lora_state_dict(transformer), cfg)
    assert path == tmp_path / LORA_FILE

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        saved = {k: f.get_tensor(k) for k in keys}
    assert all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    with torch.no_grad():
        base = pipe.transformer(**_inputs())[0]
    pipe.load_lora_weights(tmp_path)
    # every saved tensor landed in a LoRA layer of the pipeline, with its value: no key left unmatched
    loaded = loaded_adapter(pipe.transformer)
    assert set(loaded) == keys
    magnitudes = {k for k in keys if k.endswith(".lora_magnitude_vector")}
    assert len(magnitudes) == (len(keys) // 3 if kind == "dora" else 0)
    assert all(cfg.use_dora == (kind == "dora") for cfg in pipe.transformer.peft_config.values())
    for k in keys:
        torch.testing.assert_close(loaded[k], saved[k])
    with torch.no_grad():
        theirs = pipe.transformer(**_inputs())[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - base).abs().max() > 1e-3  # the LoRA is not a no-op


def test_pipeline_images_change_with_the_lora(tiny_sd3, tmp_path):
    cfg = LoraConfig(rank=4)
    transformer = _trained(tiny_sd3, cfg)
    export_lora(tmp_path, lora_state_dict(transformer), cfg)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.set_progress_bar_config(disable=True)
    kw = {"prompt": "a red circle", "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np",
          "max_sequence_length": 77}
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(tmp_path)
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(after - before).max() > 1e-3


def test_presets_and_block_selection(tiny_sd3):
    transformer = load_transformer(tiny_sd3)
    attn = target_modules(transformer, LoraConfig(targets="attention"))
    ctx = target_modules(transformer, LoraConfig(targets="attention+context"))
    everything = target_modules(transformer, LoraConfig(targets="all"))
    assert len(attn) == 2 * 4  # 2 blocks x (to_q, to_k, to_v, to_out.0)
    assert set(attn) < set(ctx) < set(everything)
    assert "transformer_blocks.0.attn.add_q_proj" in ctx and "transformer_blocks.0.ff.net.2" in everything
    only_1 = target_modules(transformer, LoraConfig(targets="attention", blocks=[1]))
    assert only_1 == [n for n in attn if n.startswith("transformer_blocks.1.")]
    assert set(PRESETS) == {"attention", "attention+context", "all"}
    with pytest.raises(ValueError, match="matches no linear layer"):
        target_modules(transformer, LoraConfig(targets=["nonexistent_proj"]))


def _casts_and_grads(transformer, params, context) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Output, LoRA gradients and the number of dtype casts of one forward + backward in `context`."""
    from torch.profiler import profile

    inputs = {k: v.bfloat16() if torch.is_tensor(v) and k != "timestep" else v for k, v in _inputs().items()}
    for p in params:
        p.grad = None
    with profile() as prof, context:
        out = transformer(**inputs)[0]
        (out.float() - 1).pow(2).mean().backward()
    casts = sum(1 for e in prof.events() if e.name == "aten::_to_copy")
    return out, [p.grad.clone() for p in params], casts


def test_lora_autocast_drops_peft_casts_and_changes_nothing(tiny_sd3):
    """On a bf16 base with fp32 LoRA weights, the loop's autocast context skips peft's cast of each LoRA input to
    fp32 (autocast casts it straight back): bitwise the same output and LoRA gradients, fewer casts."""
    targets = target_modules(load_transformer(tiny_sd3), LoraConfig(targets="attention+context"))
    # B != 0, so the LoRA branch (and its input casts) carry values and gradients
    transformer = _trained(tiny_sd3, LoraConfig(rank=4, targets="attention+context"), torch.bfloat16)
    params = [p for p in transformer.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.float32}
    ours = LoraAutocast(transformer, "cpu")
    n_layers = len(ours.layers)
    assert n_layers == len(targets)

    out_ref, grads_ref, casts_ref = _casts_and_grads(transformer, params, torch.autocast("cpu", dtype=torch.bfloat16))
    out, grads, casts = _casts_and_grads(transformer, params, ours)
    assert torch.equal(out, out_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    # peft's cast in the forward, autocast's back, and both again in the backward where the input needs a gradient
    assert 2 * n_layers <= casts_ref - casts <= 4 * n_layers

    # outside the context (validation sampling: no autocast) peft casts again, so a bf16 base with fp32 LoRA runs
    assert all(layer.cast_input_dtype_enabled for layer in ours.layers)
    inputs = {k: v.bfloat16() if torch.is_tensor(v) and k != "timestep" else v for k, v in _inputs().items()}
    with torch.no_grad():
        assert transformer(**inputs)[0].dtype == torch.bfloat16
    _, grads_again, _ = _casts_and_grads(transformer, params, ours)  # reusable
    assert all(torch.equal(a, b) for a, b in zip(grads_again, grads_ref, strict=True))


def test_lora_autocast_under_gradient_checkpointing(tiny_sd3):
    """The recomputing backward runs inside the loop's context too (strategy.backward sits in it): the checkpointed
    blocks recompute without peft's casts and give the gradients of the plain run."""
    runs = []
    for checkpointing in (False, True):
        transformer = _trained(tiny_sd3, LoraConfig(rank=4, targets="attention+context"), torch.bfloat16)
        params = [p for p in transformer.parameters() if p.requires_grad]
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        attention_calls = []
        transformer.transformer_blocks[0].attn.register_forward_hook(lambda *_, c=attention_calls: c.append(1))
        runs.append((*_casts_and_grads(transformer, params, LoraAutocast(transformer, "cpu")), len(attention_calls)))
    (out, grads, _, calls), (out_ckpt, grads_ckpt, _, calls_ckpt) = runs
    assert (calls, calls_ckpt) == (1, 2)  # the checkpointed block ran again in the backward
    assert torch.equal(out, out_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ckpt, strict=True))


@pytest.mark.parametrize("base", ["fp32", "bf16", "int8", "nf4",
                                  pytest.param("compiled", marks=pytest.mark.slow)])  # inductor: ~50 s on a new machine
def test_dora_on_every_base_the_job_allows(tiny_sd3, base):
    """lora.kind dora on each base the door lets it train on (full precision, bf16 under the loop's autocast, a
    quanto or bitsandbytes quantised base, the compiled blocks): a fresh DoRA leaves the output as it was (each
    magnitude starts at its row's norm of the same weight the forward uses), and one backward reaches every
    magnitude vector."""
    import shutil

    from raytune_sd3.models.quantize import quantize_transformer

    if base == "nf4":
        pytest.importorskip("bitsandbytes")
    if base == "compiled" and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor needs a C compiler")
    dtype = torch.float32 if base in ("fp32", "compiled") else torch.bfloat16
    transformer = quantize_transformer(load_transformer(tiny_sd3, dtype), base if base in ("int8", "nf4") else "none")
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and k != "timestep" else v for k, v in _inputs().items()}
    with torch.no_grad():
        plain = transformer(**inputs)[0]
    params = add_lora(transformer, LoraConfig(rank=4, kind="dora", targets="all"), seed=0)
    if base == "compiled":
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        compile_blocks(transformer)
    context = LoraAutocast(transformer, "cpu") if dtype == torch.bfloat16 else torch.enable_grad()
    with context:
        out = transformer(**inputs)[0]
        out.float().pow(2).mean().backward()
    torch.testing.assert_close(out.float(), plain.float(), rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-6)
    if base == "compiled":  # each block one graph: peft's weight fetch no longer breaks it at every DoRA layer
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2, dict(counters["graph_break"])
    magnitudes = {n: p for n, p in transformer.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == len(params) // 3 == len(target_modules(load_transformer(tiny_sd3),
                                                                      LoraConfig(targets="all")))
    # the last block's context queries feed only its context output, which SD3 drops: no gradient there
    assert [n for n, p in magnitudes.items() if p.grad is None or p.grad.abs().sum() == 0] == [
        "transformer_blocks.1.attn.add_q_proj.lora_magnitude_vector.default.weight"]
