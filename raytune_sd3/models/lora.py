"""LoRA on the SD3 transformer through peft: target presets, adding the adapter, saving in diffusers' layout.

The saved `pytorch_lora_weights.safetensors` has keys `transformer.transformer_blocks.N.attn.to_q.lora_A.weight`
and the adapter config in its header, so `StableDiffusion3Pipeline.load_lora_weights` matches every key; alpha is
folded into lora_B (scale 1) so ComfyUI, which reads alpha only from `.alpha` tensors, gets the same weights.
A DoRA (lora.kind dora) adds `...lora_magnitude_vector` per layer and `use_dora` in the header: folding alpha into
lora_B leaves W + BA, and so DoRA's row norms, unchanged.
LyCORIS's LoKr and LoHa (lora.kind lokr | loha) go on the same layers through models/lycoris.py; the functions here
take either, and save a LyCORIS adapter in LyCORIS's own layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from raytune_sd3 import atomic
from raytune_sd3.config import LYCORIS_KINDS, LoraConfig
from raytune_sd3.models.lycoris import (
    add_lycoris,
    has_lycoris,
    load_lycoris_tensors,
    lycoris_tensors,
    save_lycoris,
)
from raytune_sd3.run_layout import LORA as LORA_FILE

_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
_CONTEXT = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
PRESETS = {
    "attention": _ATTN + [s.replace("attn.", "attn2.") for s in _ATTN],  # attn2: SD3.5's dual-attention blocks
    "attention+context": _ATTN + [s.replace("attn.", "attn2.") for s in _ATTN] + _CONTEXT,
    "all": _ATTN + [s.replace("attn.", "attn2.") for s in _ATTN] + _CONTEXT + _FF,
}


def target_modules(transformer: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the nn.Linear modules that get LoRA, from the preset (or suffix list) and block selection."""
    suffixes = PRESETS[cfg.targets] if isinstance(cfg.targets, str) else cfg.targets
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear) or not any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        if cfg.blocks is not None:
            parts = name.split(".")
            if parts[0] != "transformer_blocks" or int(parts[1]) not in cfg.blocks:
                continue
        names.append(name)
    if not names:
        raise ValueError(f"lora.targets {cfg.targets!r} (blocks {cfg.blocks}) matches no linear layer of the model")
    return names


def add_lora(transformer: nn.Module, cfg: LoraConfig, seed: int = 0) -> list[nn.Parameter]:
    """Freeze the base, add a peft LoRA adapter (B = 0, so the output starts unchanged), or for lora.kind lokr /
    loha a LyCORIS network on the same layers; returns trainable params."""
    from peft import LoraConfig as PeftLoraConfig

    if cfg.kind in LYCORIS_KINDS:
        return add_lycoris(transformer, target_modules(transformer, cfg), cfg, seed)

    transformer.requires_grad_(False)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules(transformer, cfg),
        use_dora=cfg.kind == "dora",  # magnitudes start at each row's weight norm: the output starts unchanged too
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(peft_cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32  # fp32 LoRA even on a bf16 base by default
    for p in params:
        p.data = p.data.to(dtype)
    return params


class LoraAutocast:
    """bf16 autocast around the training and eval forwards, with peft's input casts turned off in the LoRA layers.

    peft casts each LoRA layer's input to its weights' dtype (fp32 by default) and autocast casts it straight back
    to bf16 for the matmul. Under autocast that round trip is exact, so it changes no value and costs four
    activation-sized copies per LoRA layer and step (two in the forward, two in the backward): about 150 layers
    each the width of SD3.5 Large at 1024 px. Inside this context the forward and the LoRA gradients are bitwise
    the same without them (tests/test_lora.py). Outside it, e.g. validation sampling, which runs without autocast
    on a bf16 base, peft casts as usual (fp32 LoRA compute). Reusable, not reentrant.
    """

    def __init__(self, module: nn.Module, device_type: str):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        self.device_type = device_type
        self._autocast = None

    def __enter__(self):
        self._autocast = torch.autocast(self.device_type, dtype=torch.bfloat16)
        self._autocast.__enter__()
        for layer in self.layers:
            layer.cast_input_dtype_enabled = False
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.cast_input_dtype_enabled = True
        self._autocast.__exit__(*exc)


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors of `transformer` (peft's diffusers names, unfolded; LyCORIS's), as fp32 CPU copies."""
    return {k: v.float() for k, v in adapter_tensors(transformer).items()}


def adapter_tensors(transformer: nn.Module, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors as they train (their dtype), CPU copies: peft's LoRA tensors, or a LyCORIS network's
    state dict. `params`: values to use instead of the module's, by `named_parameters` name (ZeRO's fp32 masters,
    the EMA). What checkpoints keep, and what export_lora and load_adapter_tensors take."""
    from peft.utils import get_peft_model_state_dict

    if has_lycoris(transformer):
        return lycoris_tensors(transformer, params)
    return {k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(transformer, state_dict=params).items()}


def load_adapter_tensors(transformer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy what adapter_tensors gave back into the adapter; RuntimeError naming keys the model lacks."""
    from peft.utils import set_peft_model_state_dict

    if has_lycoris(transformer):
        load_lycoris_tensors(transformer, tensors)
        return
    result = set_peft_model_state_dict(transformer, tensors)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"LoRA keys the model lacks: {result.unexpected_keys[:3]}")


def fold_alpha(tensors: dict[str, torch.Tensor], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Scale lora_B by alpha/rank, so the file means the same with alpha = rank (how ComfyUI reads it)."""
    scale = (cfg.alpha if cfg.alpha is not None else cfg.rank) / cfg.rank
    return {k: v.float() * scale if scale != 1.0 and ".lora_B." in k else v.float() for k, v in tensors.items()}


def adapter_metadata(tensors: dict[str, torch.Tensor], cfg: LoraConfig) -> dict:
    """The peft config written into the file header (alpha = rank, since the scale is folded)."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    return {"r": cfg.rank, "lora_alpha": cfg.rank, "target_modules": modules, "lora_dropout": 0.0,
            "init_lora_weights": "gaussian", "use_dora": cfg.kind == "dora"}


def export_lora(out_dir: str | Path, tensors: dict[str, torch.Tensor], cfg: LoraConfig, name: str = LORA_FILE) -> Path:
    """The user-facing file `out_dir/name` from the adapter's tensors (`adapter_tensors`) of any lora.kind, written
    atomically. A LoRA or DoRA: alpha folded, metadata in the header; loads with
    StableDiffusion3Pipeline.load_lora_weights. LoKr / LoHa: LyCORIS's own state dict (alpha as its `.alpha`
    tensors), which LyCORIS, SimpleTuner, ComfyUI and Forge load. Every adapter file the trainer writes goes through
    here (e.g. another name for a second set of weights)."""
    if cfg.kind in LYCORIS_KINDS:
        return save_lycoris(Path(out_dir) / name, tensors)
    folded = fold_alpha(tensors, cfg)
    return save_lora(out_dir, folded, adapter_metadata(folded, cfg), name)


def save_lora(out_dir: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict, name: str = LORA_FILE) -> Path:
    """Write `out_dir/name` atomically (temp file in the same folder, then rename)."""
    from diffusers import StableDiffusion3Pipeline

    def write(tmp: Path) -> None:
        StableDiffusion3Pipeline.save_lora_weights(
            tmp.parent, transformer_lora_layers=state_dict, transformer_lora_adapter_metadata=metadata,
            weight_name=tmp.name)

    return atomic.write_file(Path(out_dir) / name, write)
