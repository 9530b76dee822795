"""What a training checkpoint holds and how it is written and read back (no pickle for weights).

    pytorch_lora_weights.safetensors  the user-facing LoRA (diffusers layout, alpha folded)
    lora_raw.safetensors              peft's tensors as trained (unfolded), for resuming
    train_state.pt                    LR scheduler state, step, torch RNG, loop state (loaded with weights_only=True)
    optimizer_rank{R}.pt              optimizer state (rank 0's under DDP; each rank's shard under ZeRO)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raytune_sd3.config import LoraConfig
from raytune_sd3.models.lora import export_lora

RAW_LORA = "lora_raw.safetensors"
TRAIN_STATE = "train_state.pt"


def optimizer_file(rank: int) -> str:
    return f"optimizer_rank{rank}.pt"


def save_checkpoint(folder: Path, lora: dict[str, torch.Tensor], lora_cfg: LoraConfig, scheduler, step: int,
                    extra: dict | None = None) -> None:
    """Rank 0's part of a checkpoint; `extra` holds small loop state (floats, ints) restored on resume."""
    folder.mkdir(parents=True, exist_ok=True)
    export_lora(folder, lora, lora_cfg)
    save_file(lora, str(folder / RAW_LORA))
    torch.save({"scheduler": scheduler.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                "extra": extra or {}}, folder / TRAIN_STATE)


def save_optimizer(folder: Path, rank: int, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / optimizer_file(rank))


def load_checkpoint(folder: Path, transformer, scheduler) -> tuple[int, dict]:
    """Restore LoRA, scheduler and RNG from `folder`; returns (step it was taken at, extra loop state)."""
    from peft.utils import set_peft_model_state_dict

    raw = load_file(str(folder / RAW_LORA))
    result = set_peft_model_state_dict(transformer, raw)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"checkpoint {folder} has LoRA keys the model lacks: {result.unexpected_keys[:3]}")
    state = torch.load(folder / TRAIN_STATE, weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), dict(state.get("extra") or {})


def load_optimizer(folder: Path, rank: int) -> dict:
    path = folder / optimizer_file(rank)
    if not path.exists():
        raise RuntimeError(f"checkpoint {folder} has no {path.name}: it was written with another number of workers "
                           "or strategy; resume with the same train.num_workers and strategy")
    return torch.load(path, weights_only=True)
