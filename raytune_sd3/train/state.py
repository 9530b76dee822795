"""What a training checkpoint holds and how it is written and read back (no pickle for weights).

    pytorch_lora_weights.safetensors  the user-facing LoRA (diffusers layout, alpha folded)
    lora_raw.safetensors              peft's tensors as trained (unfolded), for resuming
    train_state.pt                    optimizer + LR scheduler state, step, torch RNG (loaded with weights_only=True)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raytune_sd3.config import LoraConfig
from raytune_sd3.models.lora import adapter_metadata, lora_state_dict, save_lora

RAW_LORA = "lora_raw.safetensors"
TRAIN_STATE = "train_state.pt"


def save_checkpoint(folder: Path, transformer, lora_cfg: LoraConfig, optimizer, scheduler, step: int) -> None:
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    save_lora(folder, lora_state_dict(transformer, lora_cfg), adapter_metadata(transformer, lora_cfg))
    raw = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    save_file(raw, str(folder / RAW_LORA))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state()}, folder / TRAIN_STATE)


def load_checkpoint(folder: Path, transformer, optimizer, scheduler) -> int:
    """Restore LoRA, optimizer, scheduler and RNG from `folder`; returns the optimizer step it was taken at."""
    from peft.utils import set_peft_model_state_dict

    raw = load_file(str(folder / RAW_LORA))
    result = set_peft_model_state_dict(transformer, raw)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint {folder} has LoRA keys the model lacks: {result.unexpected_keys[:3]}")
    state = torch.load(folder / TRAIN_STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
