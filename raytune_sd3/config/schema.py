"""The whole job: `JobConfig`, one typed schema validated at the door before Ray or any model starts, and the rules
that cross its sections.

A job is a YAML file whose sections mirror JobConfig's fields (`model`, `text`, `data`, `flow`, `lora`, `train`,
`validation`, `ray`, `wandb`, `hub`, each typed in its own module of this package); `output_dir` sits at the top level
as in SimpleTuner. Every field has a one-line docstring. Unknown keys, wrong types and impossible combinations raise
`ConfigError` naming the file and key.

The `tune:` study (TuneConfig, its Domain and SchedulerConfig) lives here too: its keys are keys of the whole job,
checked against JobConfig itself, so a module of its own would import this one and this one it (a circle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from raytune_sd3.config.adapter import INIT_FROM_SETS, LoraConfig, adapter_problem
from raytune_sd3.config.data import DataConfig
from raytune_sd3.config.flow import FlowConfig
from raytune_sd3.config.model import ModelConfig, TextConfig
from raytune_sd3.config.optimizers import BNB, OPTIMIZERS
from raytune_sd3.config.section import FolderPath, Section
from raytune_sd3.config.services import HubConfig, RayConfig, WandbConfig
from raytune_sd3.config.training import TrainConfig, quantised_base_problem
from raytune_sd3.config.tune_space import check_key
from raytune_sd3.config.validation import ValidationConfig


class Domain(Section):
    """One search dimension; exactly one of its fields is set."""

    loguniform: tuple[float, float] | None = None
    """[low, high]: sampled uniformly in log space (learning rates, norms); low > 0."""
    uniform: tuple[float, float] | None = None
    """[low, high]: sampled uniformly."""
    choice: list[Any] | None = None
    """Values picked at random (random/optuna/hyperopt) or all crossed (grid), e.g. [1.0, 3.0, auto]."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        set_ = [k for k in ("loguniform", "uniform", "choice") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"a search dimension is one of loguniform: [lo, hi], uniform: [lo, hi] or "
                             f"choice: [...]; got {set_ or 'none'}")
        for k in ("loguniform", "uniform"):
            bounds = getattr(self, k)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{k}: low must be below high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {self.loguniform[0]}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: needs at least one value")
        return self

    @model_serializer(mode="wrap")
    def _only_the_set_field(self, handler):
        # The dump (job.yaml) reads like the input: {choice: [...]}, not three keys, two of them null.
        return {k: v for k, v in handler(self).items() if v is not None}

    def contains(self, value: Any) -> bool:
        if self.choice is not None:
            return value in self.choice
        lo, hi = self.loguniform or self.uniform
        return isinstance(value, int | float) and lo <= value <= hi

    def values_to_check(self) -> list[Any]:
        """The values a trial may get at the edges of this dimension (validated against the job up front)."""
        return list(self.choice if self.choice is not None else (self.loguniform or self.uniform))


class SchedulerConfig(Section):
    type: Literal["asha", "none"] = "asha"
    """`asha`: stop the worse trials early at rungs grace_period, x reduction_factor, ...; `none`: run all to max_steps."""
    grace_period: int = Field(10, ge=1)
    """Steps every trial trains before ASHA may stop it (at least train.eval_every)."""
    reduction_factor: float = Field(2.0, gt=1)
    """ASHA keeps about 1/reduction_factor of the trials at each rung."""


class TuneConfig(Section):
    num_trials: int | None = Field(None, ge=1)
    """Trials sampled from `space` after the explicit `trials` (random/optuna/hyperopt); unset for grid."""
    metric: Literal["eval_loss"] = "eval_loss"
    """What ASHA and the searcher minimise: the eval loss (fixed sigmas and noise on held-out items)."""
    search: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    """`random` samples `space`; `grid` crosses its choice lists; optuna/hyperopt when installed (pip install ...)."""
    seed: int | None = 0
    """Seed of the searcher (the same study samples the same trials); null: a different draw each time."""
    space: dict[str, Domain] = Field(default_factory=dict)
    """Dotted job key -> search dimension, e.g. train.learning_rate: {loguniform: [5.0e-6, 1.0e-4]}."""
    trials: list[dict[str, Any]] = Field(default_factory=list)
    """Explicit trials run first, each a dict of dotted job key -> value; keys a trial does not set keep the job's
    value (not sampled)."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    """Early stopping of trials on the eval loss."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials at once; default: the cluster's GPUs (CPUs on a CPU cluster) / the workers of one trial."""

    @field_validator("space")
    @classmethod
    def _space_keys(cls, v: dict[str, Domain]) -> dict[str, Domain]:
        for key in v:
            check_key(key, JobConfig)
        return v

    @field_validator("trials")
    @classmethod
    def _trial_keys(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for point in v:
            if not point:
                raise ValueError("an explicit trial needs at least one key, e.g. {train.learning_rate: 1.0e-4}")
            for key in point:
                check_key(key, JobConfig)
        return v

    @model_validator(mode="after")
    def _combinations(self) -> TuneConfig:
        if self.search == "grid":
            continuous = [k for k, d in self.space.items() if d.choice is None]
            if continuous:
                raise ValueError(f"search: grid crosses choice lists; {', '.join(continuous)} is a range "
                                 "(use choice: [...] or search: random)")
            if self.num_trials is not None or self.trials:
                raise ValueError("search: grid runs every combination of `space` once: leave num_trials and "
                                 "trials unset (or use search: random)")
            if not self.space:
                raise ValueError("search: grid needs a `space`")
        else:
            if self.space and self.num_trials is None:
                raise ValueError("num_trials: how many trials to sample from `space` (e.g. 8)")
            if self.num_trials and not self.space:
                raise ValueError("num_trials samples from `space`, which is empty (list explicit `trials` instead)")
            if not self.space and not self.trials:
                raise ValueError("a study needs a `space` (with num_trials) or a list of `trials`")
        if self.search in ("optuna", "hyperopt"):
            extra = sorted({k for point in self.trials for k in point} - set(self.space))
            if extra:
                raise ValueError(f"search: {self.search} takes explicit trials only over keys of `space`; "
                                 f"{', '.join(extra)} is not in it")
        return self

    @property
    def total_trials(self) -> int | None:
        """Trials in the study (None for grid: the number of combinations)."""
        return None if self.search == "grid" else len(self.trials) + (self.num_trials or 0)

    @property
    def keys(self) -> list[str]:
        """Every key that may differ between trials, space keys first."""
        keys = list(self.space)
        keys += [k for point in self.trials for k in point if k not in keys]
        return list(dict.fromkeys(keys))


class JobConfig(Section):
    output_dir: FolderPath
    """Where this run writes job.yaml, metrics.jsonl, validation images and the LoRA (shared storage on clusters)."""
    name: str | None = None
    """Run name in Ray Train storage; default: output_dir's folder name."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    data: DataConfig
    flow: FlowConfig = Field(default_factory=FlowConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    tune: TuneConfig | None = None
    """A Ray Tune stability study (search space, scheduler): python -m raytune_sd3.tune."""

    @model_validator(mode="after")
    def _combinations(self) -> JobConfig:
        if self.train.lr_warmup_steps >= self.train.max_steps and self.train.lr_warmup_steps > 0:
            raise ValueError(
                f"train.lr_warmup_steps ({self.train.lr_warmup_steps}) must be below train.max_steps "
                f"({self.train.max_steps})"
            )
        ids = [d.id for d in self.data.datasets]
        if len(set(ids)) != len(ids):
            raise ValueError(f"data.datasets ids must be unique, got {ids}")
        if self.train.strategy != "ddp" and self.train.grad_clip == "value":
            raise ValueError("train.grad_clip 'value' works with train.strategy ddp only (ZeRO clips by norm)")
        if self.validation.skip_layers is not None and self.validation.skip_layer_start >= self.validation.skip_layer_stop:
            raise ValueError("validation.skip_layer_start must be below validation.skip_layer_stop")
        if self.validation.use_ema and self.train.ema_decay is None:
            raise ValueError("validation.use_ema samples with the EMA of the LoRA, which train.ema_decay keeps: set "
                             "train.ema_decay (e.g. 0.999), or remove use_ema")
        if self.validation.preview_steps is not None and self.validation.webhook_url is None:
            raise ValueError("validation.preview_steps needs validation.webhook_url (the previews are posted there); "
                             "set it, or remove preview_steps")
        if (problem := quantised_base_problem(self.model.quantize, self.model.dtype, self.train.strategy,
                                              self.train.mixed_precision)) is not None:
            raise ValueError(problem)
        if (problem := adapter_problem(self.lora.kind, self.train.strategy)) is not None:
            raise ValueError(problem)
        if self.flow.scheduled_sampling is not None and self.train.strategy == "zero3":
            raise ValueError("flow.scheduled_sampling with train.strategy zero3 cannot train: each worker rolls out "
                             "its own items a different number of forward passes, and every ZeRO-3 forward is a "
                             "collective of all workers (they would wait on each other for ever); use "
                             "train.strategy zero2 or ddp, or remove scheduled_sampling")
        if self.lora.init_from is not None and self.tune is not None:
            searched = sorted({k for k in [*self.tune.space, *(k for t in self.tune.trials for k in t)]
                               if k.split(".")[0] == "lora" and k.split(".")[-1] in INIT_FROM_SETS})
            if searched:
                raise ValueError(f"tune searches {', '.join(searched)}, which lora.init_from takes from its file: "
                                 "search other keys, or remove lora.init_from")
        return self

    @property
    def run_name(self) -> str:
        return self.name or Path(self.output_dir).name

    @property
    def cache_dir(self) -> str:
        """A local folder (absolute) or a URI."""
        return self.data.cache_dir or str(Path(self.output_dir) / "cache")

    @property
    def bitsandbytes_parts(self) -> list[str]:
        """The settings of this job that run on bitsandbytes (model.quantize nf4, the 8-bit optimizers): the
        preflight checks they can run, and a worker of a job with none leaves the library out."""
        return (["model.quantize nf4"] if self.model.quantize == "nf4" else []) + (
            [f"train.optimizer {self.train.optimizer}"] if OPTIMIZERS[self.train.optimizer].package == BNB else [])


