"""LyCORIS LoKr / LoHa on the SD3 transformer (lora.kind lokr | loha) through the lycoris-lora library.

The network goes on the same linears as our LoRA (models/lora.py target_modules) and is kept as the transformer's
submodule `lycoris`, so its parameters are the model's: DDP reduces their gradients, DeepSpeed ZeRO-2 shards their
optimizer state, the EMA and checkpoints find them by name, and validation sampling runs through them (LyCORIS
replaces each adapted layer's forward with its own). The saved file is LyCORIS's own state dict, the SD3 layout
SimpleTuner writes and ComfyUI and Forge load: `lycoris_transformer_blocks_0_attn_to_q.lokr_w1` (and `.lokr_w2`
or `.lokr_w2_a/_b`, `.hada_w1_a` ... for LoHa) with an `.alpha` per layer; create_lycoris_from_weights reads it.
peft's LoKr/LoHa would write peft's own key names, which none of those load (and diffusers loads no peft LoHa).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from raytune_sd3 import atomic
from raytune_sd3.config import LoraConfig

NETWORK = "lycoris"  # the transformer's submodule that holds the LyCORIS network


def add_lycoris(transformer: nn.Module, modules: list[str], cfg: LoraConfig, seed: int = 0) -> list[nn.Parameter]:
    """Freeze the base and put a LyCORIS network of lora.kind on `modules` (full names of its linears); its update
    starts at zero (LoKr's w2 / LoHa's w*_b), so the output starts unchanged. Returns the trainable parameters."""
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = _network(transformer, modules, cfg)
    network.apply_to()  # each target's forward becomes the LyCORIS module's
    transformer.add_module(NETWORK, network)
    network.requires_grad_(True)
    params = list(network.parameters())
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    for p in params:
        p.data = p.data.to(dtype)
    return params


def _network(module: nn.Module, names: list[str], cfg: LoraConfig):
    import logging

    from lycoris import LycorisNetwork

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # its INFO lines (a dozen per network) are for its CLI

    # LyCORIS keeps its targets in class attributes; each network is built right after setting them, exact names only
    LycorisNetwork.apply_preset({"enable_conv": False, "target_module": [], "target_name": names, "use_fnmatch": True,
                                 "module_algo_map": {}, "name_algo_map": {}, "exclude_name": [],
                                 "lora_prefix": "lycoris"})
    lokr = cfg.lycoris_settings
    own = {"factor": lokr.factor, "full_matrix": lokr.full_matrix} if cfg.kind == "lokr" else {}
    # bypass: each layer adds its factors' product applied to the input (x W^T + x dW^T) instead of rebuilding
    # (W + dW) - W, which on a bf16 base rounds a small dW to the weight's ulp (98% of it lost at |dW|/|W| = 1e-4)
    # and keeps an out x in weight per layer for backward
    network = LycorisNetwork(module, multiplier=1.0, lora_dim=cfg.rank,
                             alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                             network_module=cfg.kind, warn_on_unmatched=False, bypass_mode=True, **own)
    if len(network.loras) != len(names):
        raise ValueError(f"lora.kind {cfg.kind}: LyCORIS adapted {len(network.loras)} of the {len(names)} layers "
                         "lora.targets selects")
    return network


def has_lycoris(transformer: nn.Module) -> bool:
    return isinstance(getattr(transformer, NETWORK, None), nn.Module)


def lycoris_tensors(transformer: nn.Module, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The network's state dict as LyCORIS saves it (`lycoris_<layer>.lokr_w1`, `.alpha`, ...), CPU copies.
    `params`: values to use instead of the module's, by the transformer's parameter names (ZeRO's fp32 masters,
    the EMA)."""
    tensors = dict(getattr(transformer, NETWORK).state_dict())
    prefix = NETWORK + "."
    tensors.update({name.removeprefix(prefix): v for name, v in (params or {}).items() if name.startswith(prefix)})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def load_lycoris_tensors(transformer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy what lycoris_tensors gave into the network; RuntimeError naming the keys that do not fit."""
    getattr(transformer, NETWORK).load_state_dict(tensors, strict=True)


def save_lycoris(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write LyCORIS's state dict to `path` atomically, fp32, as LyCORIS's save_weights does (no header needed)."""
    from safetensors.torch import save_file

    floats = {k: v.float().contiguous() for k, v in tensors.items()}
    return atomic.write_file(path, lambda tmp: save_file(floats, str(tmp)))


@lru_cache(maxsize=256)
def lycoris_layer_params(kind: str, in_features: int, out_features: int, rank: int, factor: int = -1,
                         full_matrix: bool = False) -> int:
    """Parameters LyCORIS gives one in x out linear (counted by the library itself, on the meta device)."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    with torch.device("meta"):
        layer = nn.Linear(in_features, out_features, bias=False)
        if kind == "lokr":
            adapter = LokrModule("count", layer, lora_dim=rank, alpha=rank, factor=factor, full_matrix=full_matrix)
        else:
            adapter = LohaModule("count", layer, lora_dim=rank, alpha=rank)
    return sum(p.numel() for p in adapter.parameters())
