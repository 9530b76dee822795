"""The `tune:` section of a job: what a stability study searches, how, and when it stops a trial early.

Search-space keys are dotted job paths (`train.learning_rate`, `flow.shift`); a trial is the job with those keys
set. Only keys that change training, not the cache or the eval loss, may vary: every trial shares one cache and
one eval set, so their eval losses are comparable. No Ray import here: `load_job` validates this section.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_serializer, model_validator

from raytune_sd3.config import ConfigError, JobConfig, Section, load_job

# Keys that may vary between trials: whole sections, minus the keys below.
TUNABLE_PREFIXES = ("train.", "flow.", "lora.", "data.caption_dropout")
FIXED_KEYS = {
    "flow.eval_sigmas": "it defines the eval loss: trials would not be comparable",
    "train.max_steps": "ASHA's budget is in steps: set it in the job",
    "train.eval_every": "ASHA compares eval losses at these steps: set it in the job",
    "train.max_nonfinite_steps": "the divergence rule must be the same for every trial",
    "train.divergence_factor": "the divergence rule must be the same for every trial",
    "train.grad_norm_limit": "the divergence rule must be the same for every trial",
    "train.use_gpu": "a study-wide setting",
}
SEARCH_PACKAGES = ("optuna", "hyperopt")  # searchers that need their package installed
WHY_NOT = ("trials share one cache and one eval set, so only train.*, flow.*, lora.* and data.caption_dropout "
           "may vary")


def check_key(key: str) -> str:
    """A dotted path that exists in the job schema and may vary between trials; ValueError naming the fix."""
    if key in FIXED_KEYS:
        raise ValueError(f"{key} cannot vary between trials: {FIXED_KEYS[key]}")
    if not key.startswith(TUNABLE_PREFIXES):
        raise ValueError(f"{key} cannot vary between trials: {WHY_NOT}")
    model: Any = JobConfig
    for part in key.split("."):
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(fields) or 'none, it is a value'}"
            raise ValueError(f"{key}: no such job key ({hint})")
        model = fields[part].annotation
    return key


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
            check_key(key)
        return v

    @field_validator("trials")
    @classmethod
    def _trial_keys(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for point in v:
            if not point:
                raise ValueError("an explicit trial needs at least one key, e.g. {train.learning_rate: 1.0e-4}")
            for key in point:
                check_key(key)
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


def set_key(raw: dict, key: str, value: Any) -> None:
    """raw[a][b] = value for key "a.b" (sections created as needed)."""
    *sections, leaf = key.split(".")
    node = raw
    for s in sections:
        if not isinstance(node.get(s), dict):
            node[s] = {}
        node = node[s]
    node[leaf] = value


def get_key(raw: dict, key: str) -> Any:
    """raw[a][b] for key "a.b"; None where a section or key is missing."""
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def explicit_trials(tc: TuneConfig, base: dict) -> list[dict[str, Any]]:
    """The explicit trials with every key the study varies set (Optuna and HyperOpt take only complete points):
    what a trial does not set keeps the job's value."""
    return [{**{k: get_key(base, k) for k in tc.keys}, **point} for point in tc.trials]


def job_for_params(base: dict, params: dict[str, Any], output_dir: Path | str) -> JobConfig:
    """The study's job (a JobConfig dump) with `params` set, its own output_dir and no `tune:` section.

    Raises ConfigError naming the key when a value is out of range (e.g. flow.shift: -1).
    """
    raw = copy.deepcopy(base)
    raw.pop("tune", None)
    study_name = raw.get("name") or Path(raw["output_dir"]).name
    raw["name"] = None
    wandb = raw.get("wandb") or {}
    if wandb.get("project"):  # one W&B group per study; each trial's run is named by its trial id
        wandb["group"] = wandb.get("group") or study_name
        wandb["name"] = f"{wandb['name']}-{Path(output_dir).name}" if wandb.get("name") else None
    raw["output_dir"] = str(output_dir)
    for key, value in params.items():
        set_key(raw, key, value)
    return load_job(raw=raw)


# --- the study as a whole (checked before Ray starts) -----------------------------------------------------

def study_config(cfg: JobConfig) -> TuneConfig:
    """The job's `tune:` section as a TuneConfig; ConfigError for a job without one."""
    if cfg.tune is None:
        raise ConfigError("this job has no `tune:` section (jobs/tune-tiny.yaml is a working example); "
                          "to train one job use python -m raytune_sd3.train")
    return TuneConfig.model_validate(cfg.tune)


def study_base(cfg: JobConfig) -> dict:
    """The job every trial starts from, with the cache pinned to the study's (trials never encode)."""
    base = cfg.model_dump(mode="json")
    base["data"]["cache_dir"] = str(cfg.cache_dir)
    return base


def check_study(cfg: JobConfig) -> TuneConfig:
    """Everything about the study that can be checked before Ray starts; ConfigError naming the key otherwise."""
    tc = study_config(cfg)
    problems = []
    if cfg.data.eval_samples < 1:
        problems.append("data.eval_samples: the study ranks trials by eval loss; hold out at least 1 item")
    if tc.scheduler.type == "asha":
        if cfg.train.eval_every is None:
            problems.append(f"train.eval_every: ASHA compares eval losses during training; set it (e.g. "
                            f"{tc.scheduler.grace_period}, the grace period) or use tune.scheduler.type: none")
        elif tc.scheduler.grace_period < cfg.train.eval_every:
            problems.append(f"tune.scheduler.grace_period ({tc.scheduler.grace_period}) must be at least "
                            f"train.eval_every ({cfg.train.eval_every}): ASHA needs an eval loss at each rung")
        if tc.scheduler.grace_period >= cfg.train.max_steps:
            problems.append(f"tune.scheduler.grace_period ({tc.scheduler.grace_period}) must be below "
                            f"train.max_steps ({cfg.train.max_steps}), or ASHA never stops a trial")
    if tc.search in SEARCH_PACKAGES:
        import importlib.util

        if importlib.util.find_spec(tc.search) is None:
            problems.append(f"tune.search: {tc.search} is not installed (pip install {tc.search}); "
                            "search: random needs nothing")
    # Every value a trial can get must make a valid job: fail now, not in trial 7 of 20.
    base = study_base(cfg)
    checks = [(f"tune.space.{k}", {k: v}) for k, d in tc.space.items() for v in d.values_to_check()]
    checks += [(f"tune.trials.{i}", point) for i, point in enumerate(tc.trials)]
    if tc.search in SEARCH_PACKAGES:  # their searchers refuse a first point outside the space
        for i, point in enumerate(explicit_trials(tc, base)):
            outside = [f"{k}={v!r}" for k, v in point.items() if not tc.space[k].contains(v)]
            if outside:
                problems.append(f"tune.trials.{i}: {', '.join(outside)} is outside tune.space ({tc.search} "
                                "needs explicit trials inside it; set the key in the trial or widen the space)")
    for where, params in checks:
        try:
            job_for_params(base, params, Path(cfg.output_dir) / "trials" / "check")
        except ConfigError as e:
            detail = str(e).split("\n", 1)[-1].strip()
            problems.append(f"{where}: {params} makes an invalid job: {detail}")
    if problems:
        raise ConfigError("invalid study:\n  " + "\n  ".join(problems))
    return tc
