"""The `tune:` section of a job: what a stability study searches, how, and when it stops a trial early.

Search-space keys are dotted job paths (`train.learning_rate`, `flow.shift`); a trial is the job with those keys
set. Only keys that change training, not the cache or the eval loss, may vary: every trial shares one cache and
one eval set, so their eval losses are comparable. No Ray import here: `load_job` validates this section.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from raytune_sd3.config import (  # noqa: F401 - the section's schema lives in config/; re-exported here
    FIXED_KEYS,
    SEARCH_PACKAGES,
    TUNABLE_PREFIXES,
    ConfigError,
    Domain,
    JobConfig,
    SchedulerConfig,
    TuneConfig,
    check_key,
    get_key,
    load_job,
    set_key,
)
from raytune_sd3.run_layout import RunLayout


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
    return cfg.tune


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
            job_for_params(base, params, RunLayout.of(cfg).trial("check"))
        except ConfigError as e:
            detail = str(e).split("\n", 1)[-1].strip()
            problems.append(f"{where}: {params} makes an invalid job: {detail}")
    if problems:
        raise ConfigError("invalid study:\n  " + "\n  ".join(problems))
    return tc
