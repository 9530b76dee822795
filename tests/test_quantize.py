"""A quanto-quantised base: the right layers quantised, output close to the full-precision one, LoRA trains on top
and its file loads into an unquantised pipeline with every key matched."""

import fnmatch

import pytest
import torch
from optimum.quanto.nn import QLinear
from torch import nn

from raytune_sd3.config import LoraConfig
from raytune_sd3.models.loading import load_transformer
from raytune_sd3.models.lora import add_lora, export_lora, lora_state_dict
from raytune_sd3.models.quantize import KEEP_FULL_PRECISION, quantize_transformer


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
    opt = torch.optim.AdamW(params, lr=1e-2)
    target = torch.zeros_like(ref)
    losses = []
    for _ in range(8):
        loss = ((model(**_inputs())[0] - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0]

    export_lora(tmp_path, lora_state_dict(model), cfg)
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(tmp_path)
    n_lora = sum(1 for k in pipe.transformer.state_dict() if "lora_" in k)
    assert n_lora == len(lora_state_dict(model)) == 2 * 2 * 4  # A and B x 2 blocks x 4 attention layers
