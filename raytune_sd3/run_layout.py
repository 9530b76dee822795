"""Every file and folder a run keeps under its output_dir, named once (a new file: one name here, one property
on RunLayout, one line in this map).

    output_dir/
      job.yaml                          the resolved job, secrets stripped (JOB; write_job)
      metrics.jsonl                     one JSON object per logged step, rank 0's (METRICS)
      pytorch_lora_weights.safetensors  the final LoRA, copied out of the last checkpoint (LORA)
      pytorch_lora_weights_ema.safetensors  with train.ema_decay: the EMA of its weights, same layout (EMA_LORA)
      curves.png                        loss and CLIP score over the steps (CURVES)
      README.md  images/                the model card and the validation images it shows (CARD, CARD_IMAGES)
      validation/step_NNNNNN/NN_WxH.png validation images by step, prompt NN at WxH (VALIDATION)
      manifest.parquet                  what the workers train on (MANIFEST; an earlier version wrote manifest.json)
      cache_report.json                 what the cache stage encoded, reused and skipped (CACHE_REPORT)
      cache/                            the default data.cache_dir (config.py names it: config imports nothing)
      ray.log  error.log                third parties' chatter; the whole error of a failed run (RAY_LOG, ERROR_LOG)
      error.previous.log                a failed attempt's error.log, set aside once a run succeeds
      wandb_run_id  wandb/              the W&B run every restart resumes; W&B's offline runs
      ray/<run_name>/                   Ray Train's run (or Tune's study): RunLayout.run_dir
        raytune_sd3_settings.json       the settings a resumed run must share (SETTINGS)
        checkpoint_*/                   Ray Train's checkpoints, each holding (train/checkpoint.py):
          pytorch_lora_weights.safetensors  lora_raw.safetensors  train_state.pt  optimizer_rank{R}.pt
          pytorch_lora_weights_ema.safetensors  lora_ema_raw.safetensors   with train.ema_decay (train/ema.py)
          checkpoint.json               the step and every file of every rank with its size
      trials/<trial_id>/                a study's trials, each laid out as a run of its own (TRIALS)
      trials.csv trials.md eval_loss.png stability.png best.yaml   a study's report (STUDY_REPORT)
      best/                             the output_dir best.yaml gives the best trial's job (STUDY_BEST_RUN)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raytune_sd3 import atomic
from raytune_sd3.config import JobConfig, dump_job

JOB = "job.yaml"
METRICS = "metrics.jsonl"
LORA = "pytorch_lora_weights.safetensors"
EMA_LORA = "pytorch_lora_weights_ema.safetensors"
CURVES = "curves.png"
CARD = "README.md"
CARD_IMAGES = "images"
VALIDATION = "validation"
MANIFEST = "manifest.parquet"
LEGACY_MANIFEST = "manifest.json"
CACHE_REPORT = "cache_report.json"
RAY_LOG = "ray.log"
ERROR_LOG = "error.log"
PREVIOUS_ERROR_LOG = "error.previous.log"
WANDB_RUN_ID = "wandb_run_id"
RAY_STORAGE = "ray"
SETTINGS = "raytune_sd3_settings.json"
TRIALS = "trials"
STUDY_TABLE_CSV, STUDY_TABLE_MD = "trials.csv", "trials.md"
STUDY_CURVES, STUDY_MAP, STUDY_BEST = "eval_loss.png", "stability.png", "best.yaml"
STUDY_REPORT = (STUDY_TABLE_CSV, STUDY_TABLE_MD, STUDY_CURVES, STUDY_MAP, STUDY_BEST)
STUDY_BEST_RUN = "best"  # the output_dir best.yaml gives its run

# Inside a checkpoint folder (train/checkpoint.py writes and reads them)
CHECKPOINT_FOLDERS = "checkpoint_*"  # Ray Train's names for them
CHECKPOINT_LORA = LORA  # the user-facing LoRA (diffusers layout, alpha folded)
CHECKPOINT_RAW_LORA = "lora_raw.safetensors"  # peft's tensors as trained (unfolded), for resuming
CHECKPOINT_EMA_LORA = EMA_LORA  # with train.ema_decay: the EMA as a user-facing LoRA
CHECKPOINT_RAW_EMA = "lora_ema_raw.safetensors"  # with train.ema_decay: the EMA by parameter name, fp32
CHECKPOINT_TRAIN_STATE = "train_state.pt"  # LR schedule, step, torch RNG, loop state
CHECKPOINT_RECORD = "checkpoint.json"  # the step and every file of every rank with its size


def checkpoint_optimizer(rank: int) -> str:
    """A rank's optimizer state in a checkpoint (rank 0's under DDP; each rank's shard under ZeRO)."""
    return f"optimizer_rank{rank}.pt"


def validation_step(step: int) -> str:
    return f"step_{step:06d}"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run's files: `RunLayout.of(cfg)`, or `RunLayout(output_dir)` where only the folder is
    known (a finished run's folder given to `python -m raytune_sd3.hub`)."""

    output_dir: Path
    run_name: str = ""

    @classmethod
    def of(cls, cfg: JobConfig) -> RunLayout:
        # Resolved (load_job has already done it for a job read from a file): Ray's workers run elsewhere.
        return cls(Path(cfg.output_dir).expanduser().resolve(), cfg.run_name)

    def __post_init__(self):
        object.__setattr__(self, "output_dir", Path(self.output_dir))

    def _at(self, name: str) -> Path:
        return self.output_dir / name

    job = property(lambda self: self._at(JOB))
    metrics = property(lambda self: self._at(METRICS))
    lora = property(lambda self: self._at(LORA))
    ema_lora = property(lambda self: self._at(EMA_LORA))
    curves = property(lambda self: self._at(CURVES))
    card = property(lambda self: self._at(CARD))
    card_images = property(lambda self: self._at(CARD_IMAGES))
    validation = property(lambda self: self._at(VALIDATION))
    manifest = property(lambda self: self._at(MANIFEST))
    legacy_manifest = property(lambda self: self._at(LEGACY_MANIFEST))
    cache_report = property(lambda self: self._at(CACHE_REPORT))
    ray_log = property(lambda self: self._at(RAY_LOG))
    error_log = property(lambda self: self._at(ERROR_LOG))
    previous_error_log = property(lambda self: self._at(PREVIOUS_ERROR_LOG))
    wandb_run_id = property(lambda self: self._at(WANDB_RUN_ID))
    trials = property(lambda self: self._at(TRIALS))
    study_report = property(lambda self: tuple(self._at(name) for name in STUDY_REPORT))

    @property
    def ray_storage(self) -> Path:
        """Ray Train's (and Tune's) storage_path: always a local folder, the output_dir's."""
        return self._at(RAY_STORAGE)

    @property
    def run_dir(self) -> Path:
        """Where Ray Train keeps this run's checkpoints (and a Tune study its state)."""
        if not self.run_name:
            raise ValueError(f"{self.output_dir}: the run's name is needed for its run folder (RunLayout.of(cfg))")
        return self.ray_storage / self.run_name

    @property
    def settings(self) -> Path:
        return self.run_dir / SETTINGS

    def validation_images(self, step: int) -> Path:
        return self.validation / validation_step(step)

    def validation_steps(self) -> list[Path]:
        """The validation/step_* folders, oldest first."""
        return sorted(self.validation.glob("step_*"))

    def trial(self, trial_id: str) -> Path:
        """A study trial's output_dir."""
        return self.trials / trial_id


def write_job(cfg: JobConfig) -> Path:
    """output_dir/job.yaml: the resolved job, secrets stripped (atomically); returns its path."""
    return atomic.write_text(RunLayout.of(cfg).job, dump_job(cfg))
