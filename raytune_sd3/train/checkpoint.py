"""A training checkpoint: writing it (every rank's part, then rank 0's record of them), reading it back, and
choosing the one a restart resumes from. What a checkpoint folder holds (names: run_layout.py):

    pytorch_lora_weights.safetensors  the user-facing LoRA (diffusers layout, alpha folded; LyCORIS's for lokr/loha)
    lora_raw.safetensors              the adapter's tensors as trained (peft's unfolded, or LyCORIS's), for resuming
    train_state.pt                    LR scheduler state, step, torch RNG, loop state (loaded with weights_only=True)
    optimizer_rank{R}.pt              optimizer state (rank 0's under DDP; each rank's shard under ZeRO)
    lora_ema_raw.safetensors          with train.ema_decay: the EMA by parameter name, fp32 (train/ema.py), and
    pytorch_lora_weights_ema.safetensors   the EMA as a user-facing LoRA, beside the LoRA
    checkpoint.json                   the step and every file of every rank with its size: a checkpoint on storage
                                      is complete when all of them are there, whole

Ray Train knows a checkpoint only once its controller has taken the report (about every 2 s): a worker lost just
after writing one would restart from the one before. So a restart also looks on storage (`newest_on_storage`) and
resumes from the newest complete checkpoint there, registered or not (`choose_resume_point`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raytune_sd3 import atomic
from raytune_sd3.config import LoraConfig
from raytune_sd3.models.lora import export_lora, load_adapter_tensors
from raytune_sd3.run_layout import (
    CHECKPOINT_EMA_LORA,
    CHECKPOINT_FOLDERS,
    CHECKPOINT_LORA,
    CHECKPOINT_RAW_LORA,
    CHECKPOINT_RECORD,
    CHECKPOINT_TRAIN_STATE,
    checkpoint_optimizer,
)

# --- writing -------------------------------------------------------------------------------------------------------


def write_checkpoint(folder: Path, step: int, rank: int, world: int, lora: dict[str, torch.Tensor],
                     lora_cfg: LoraConfig, scheduler, extra: dict, optimizer_state: Callable[[], dict],
                     sharded_optimizer: bool, more_files: Callable[[Path], None] | None = None) -> bool:
    """Every rank's part of the checkpoint of `step` into its own `folder` (the temp folder it reports to Ray
    Train): rank 0's LoRA and loop state (`extra`: small floats and ints restored on resume) and whatever
    `more_files` writes there (the EMA's files), each optimizer shard where sharded (else rank 0's state), and rank
    0's record of every rank's files. A collective where world > 1: every rank calls it. Returns whether this rank
    wrote any file."""
    if rank == 0:
        save_checkpoint(folder, lora, lora_cfg, scheduler, step, extra)
        if more_files is not None:
            more_files(folder)
    if rank == 0 or sharded_optimizer:
        save_optimizer(folder, rank, optimizer_state())
    sizes = [file_sizes(folder)]
    if world > 1:  # rank 0's record lists every rank's files: a partly uploaded checkpoint is not complete
        sizes = [None] * world
        torch.distributed.all_gather_object(sizes, file_sizes(folder))
    if rank == 0:
        write_record(folder, step, {k: v for s in sizes for k, v in s.items()})
    return any(folder.iterdir())


def save_checkpoint(folder: Path, lora: dict[str, torch.Tensor], lora_cfg: LoraConfig, scheduler, step: int,
                    extra: dict | None = None) -> None:
    """Rank 0's part of a checkpoint; `extra` holds small loop state (floats, ints) restored on resume."""
    folder.mkdir(parents=True, exist_ok=True)
    export_lora(folder, lora, lora_cfg)
    save_file(lora, str(folder / CHECKPOINT_RAW_LORA))
    torch.save({"scheduler": scheduler.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                "extra": extra or {}}, folder / CHECKPOINT_TRAIN_STATE)


def save_optimizer(folder: Path, rank: int, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / checkpoint_optimizer(rank))


def file_sizes(folder: Path) -> dict[str, int]:
    """This rank's checkpoint files and their sizes."""
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


def write_record(folder: Path, step: int, sizes: dict[str, int]) -> None:
    """Rank 0, after every rank saved its files: what a complete copy of this checkpoint holds."""
    atomic.write_text(folder / CHECKPOINT_RECORD, json.dumps({"step": step, "files": sizes}))


# --- reading -------------------------------------------------------------------------------------------------------


def load_checkpoint(folder: Path, transformer, scheduler) -> tuple[int, dict]:
    """Restore LoRA, scheduler and RNG from `folder`; returns (step it was taken at, extra loop state)."""
    try:
        load_adapter_tensors(transformer, load_file(str(folder / CHECKPOINT_RAW_LORA)))
    except RuntimeError as e:
        raise RuntimeError(f"checkpoint {folder}: its adapter does not fit the model ({e})") from None
    state = torch.load(folder / CHECKPOINT_TRAIN_STATE, weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), dict(state.get("extra") or {})


def load_optimizer(folder: Path, rank: int) -> dict:
    path = folder / checkpoint_optimizer(rank)
    if not path.exists():
        raise RuntimeError(f"checkpoint {folder} has no {path.name}: it was written with another number of workers "
                           "or strategy; resume with the same train.num_workers and strategy")
    return torch.load(path, weights_only=True)


def copy_final_lora(checkpoint_dir: Path | str, output_dir: Path | str) -> Path:
    """Copy a checkpoint's LoRA file, and its EMA LoRA where train.ema_decay made one, into output_dir (atomically:
    a reader never sees half a file). Returns the LoRA's path."""
    ema = Path(checkpoint_dir) / CHECKPOINT_EMA_LORA
    if ema.exists():
        atomic.copy_file(ema, Path(output_dir) / CHECKPOINT_EMA_LORA)
    return atomic.copy_file(Path(checkpoint_dir) / CHECKPOINT_LORA, Path(output_dir) / CHECKPOINT_LORA)


# --- which one a restart resumes from ------------------------------------------------------------------------------


def read_record(folder: Path) -> dict | None:
    """The checkpoint's record if every file it lists is present with its size, else None."""
    try:
        record = json.loads((folder / CHECKPOINT_RECORD).read_text())
        if all((folder / name).stat().st_size == size for name, size in record["files"].items()):
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def newest_on_storage(run_dir: Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete checkpoint Ray Train uploaded under `run_dir`, registered or not."""
    found = [(rec["step"], folder) for folder in run_dir.glob(CHECKPOINT_FOLDERS) if (rec := read_record(folder))]
    return max(found, key=lambda sf: sf[0]) if found else None


def any_on_storage(run_dir: Path) -> bool:
    """Whether Ray Train left a checkpoint (complete or not) of the run in `run_dir` to resume from."""
    return any(run_dir.glob(CHECKPOINT_FOLDERS))


@dataclass(frozen=True)
class ResumePoint:
    """Where a restart resumes: Ray Train's registered checkpoint, or a newer complete one on storage."""

    folder: Path
    step: int | None  # from its record (None: Ray Train's checkpoint has no whole record)
    registered: bool

    def describe(self, registered_step: int | None = None) -> str:
        if self.registered:
            return ("resuming from " + (f"step {self.step} " if self.step is not None else "")
                    + f"(Ray Train's checkpoint {self.folder.name})")
        known = f"step {registered_step}" if registered_step is not None else "none"
        return (f"resuming from step {self.step} ({self.folder.name}), the newest complete checkpoint on storage "
                f"(Ray Train had registered {known})")


def choose_resume_point(run_dir: Path | None, registered: Path | None) -> tuple[ResumePoint | None, str]:
    """The checkpoint a restart resumes from (None: a fresh start), and the line that says so. `run_dir`: the
    run's local folder of checkpoints (None where it is not local); `registered`: Ray Train's checkpoint folder.
    The newest complete one on storage wins over a registered one with an older record."""
    found = newest_on_storage(run_dir) if run_dir is not None and run_dir.is_dir() else None
    record = read_record(registered) if registered is not None and registered.is_dir() else None
    if found and (registered is None or (record is not None and found[0] > record["step"])):
        point = ResumePoint(found[1], found[0], registered=False)
        return point, point.describe(record["step"] if record else None)
    if registered is not None:
        point = ResumePoint(registered, record["step"] if record else None, registered=True)
        return point, point.describe()
    return None, ""


def resume_point(run_dir: str | None, rank: int, world: int):
    """A context giving the checkpoint folder to resume from (None: a fresh start), as choose_resume_point picks
    it. Rank 0 decides, so every rank loads the same one."""
    import ray.train

    registered = ray.train.get_checkpoint()
    choice: list = [None]
    if rank == 0:
        point, line = choose_resume_point(Path(run_dir) if run_dir else None,
                                          Path(registered.path) if registered is not None else None)
        if point is not None:
            print(f"raytune_sd3: {line}", flush=True)
            choice = ["registered" if point.registered else str(point.folder)]
    if world > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    if choice[0] == "registered":
        return registered.as_directory()  # a copy where Ray Train's storage is not this machine's
    return contextlib.nullcontext(choice[0])
