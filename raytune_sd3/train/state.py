"""What a training checkpoint holds and how it is written and read back (no pickle for weights).

    pytorch_lora_weights.safetensors  the user-facing LoRA (diffusers layout, alpha folded)
    lora_raw.safetensors              peft's tensors as trained (unfolded), for resuming
    train_state.pt                    LR scheduler state, step, torch RNG, loop state (loaded with weights_only=True)
    optimizer_rank{R}.pt              optimizer state (rank 0's under DDP; each rank's shard under ZeRO)
    lora_ema_raw.safetensors          with train.ema_decay: the EMA by parameter name, fp32 (train/ema.py), and
    pytorch_lora_weights_ema.safetensors   the EMA as a user-facing LoRA, beside the LoRA
    checkpoint.json                   the step and every file of every rank with its size: a checkpoint on storage
                                      is complete when all of them are there, whole

Ray Train knows a checkpoint only once its controller has taken the report (about every 2 s): a worker lost just
after writing one would restart from the one before. So a restart also looks on storage (`newest_on_storage`) and
resumes from the newest complete checkpoint there, registered or not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raytune_sd3.config import LoraConfig
from raytune_sd3.models.lora import export_lora

RAW_LORA = "lora_raw.safetensors"
TRAIN_STATE = "train_state.pt"
RECORD = "checkpoint.json"


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


def file_sizes(folder: Path) -> dict[str, int]:
    """This rank's checkpoint files and their sizes."""
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


def write_record(folder: Path, step: int, sizes: dict[str, int]) -> None:
    """Rank 0, after every rank saved its files: what a complete copy of this checkpoint holds."""
    tmp = folder / f".{RECORD}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": sizes}))
    os.replace(tmp, folder / RECORD)


def read_record(folder: Path) -> dict | None:
    """The checkpoint's record if every file it lists is present with its size, else None."""
    try:
        record = json.loads((folder / RECORD).read_text())
        if all((folder / name).stat().st_size == size for name, size in record["files"].items()):
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def newest_on_storage(run_dir: Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete checkpoint Ray Train uploaded under `run_dir`, registered or not."""
    found = [(rec["step"], folder) for folder in run_dir.glob("checkpoint_*") if (rec := read_record(folder))]
    return max(found, key=lambda sf: sf[0]) if found else None
