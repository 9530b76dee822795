"""A stability study on Ray Tune: the `tune:` space becomes Tune's, each trial fits a TorchTrainer (Train V2).

driver:  (the CLI: check_study, prepare_data once) -> Tuner(trial fn).fit(), or Tuner.restore(...).fit() to resume
         -> collect_trials (what happened to each trial, for report.py) -> keep_final_loras (into trial folders)
trial:   the job with the trial's keys set, output_dir <study>/trials/<trial_id>, the study's cache and manifest
         -> build_trainer(..., callbacks=[StudyReportCallback()]).fit()
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from raytune_sd3.config import JobConfig
from raytune_sd3.run_layout import RunLayout, write_job
from raytune_sd3.tune.config import (
    TuneConfig,
    explicit_trials,
    get_key,
    job_for_params,
    study_base,
    study_config,
)
from raytune_sd3.tune.report import TrialRecord, read_initial_eval, trial_record

log = logging.getLogger(__name__)

OBJECTIVE = "objective"
"""What Tune's scheduler and searcher minimise: the latest eval loss, present in every report."""
DIVERGED_OBJECTIVE = 1e6
"""The objective of a diverged trial: worse than any eval loss, yet finite (inf turns ASHA's percentiles into NaN)."""
TRIAL_CPU = 0.01
ENDED = ("TERMINATED", "ERROR")  # Tune's statuses of a trial that --resume leaves as it is (failed: with --retry-failed)
"""CPUs of a trial's own actor, which only waits on its TorchTrainer (Tune refuses {"cpu": 0})."""


# --- the search ----------------------------------------------------------------------------------------------------

def search_space(tc: TuneConfig, base: dict) -> dict[str, Any]:
    """Tune's param_space, flat with dotted keys. Keys only explicit trials set are constants (their job values):
    Tune requires every key of a preset trial to be in the space."""
    space: dict[str, Any] = {}
    for key, d in tc.space.items():
        if tc.search == "grid":
            space[key] = tune.grid_search(d.choice)
        elif d.loguniform is not None:
            space[key] = tune.loguniform(*d.loguniform)
        elif d.uniform is not None:
            space[key] = tune.uniform(*d.uniform)
        else:
            space[key] = tune.choice(d.choice)
    for key in tc.keys:
        space.setdefault(key, get_key(base, key))
    return space


def make_search_alg(tc: TuneConfig, base: dict, max_concurrent: int):
    """The searcher, limited to max_concurrent running trials. (TuneConfig(max_concurrent_trials=...) would be
    ignored, with a warning, for a BasicVariantGenerator passed in: the limit goes into the searcher itself.)"""
    from ray.tune.search import ConcurrencyLimiter

    points = explicit_trials(tc, base) or None
    if tc.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points, seed=tc.seed), max_concurrent)
    if tc.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return ConcurrencyLimiter(HyperOptSearch(points_to_evaluate=points, random_state_seed=tc.seed),
                                  max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, random_state=tc.seed, max_concurrent=max_concurrent)


def make_asha(tc: TuneConfig, max_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tc.scheduler.type == "none":
        return FIFOScheduler()
    # time_attr "step": the grace period and rungs count optimizer steps, whatever the reporting rate.
    # stop_last_trials=False: a trial that reaches max_steps ends by itself (Tune would kill it at its last
    # report, before its trainer returns and the trial exports its LoRA).
    return ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=tc.scheduler.grace_period,
                         reduction_factor=tc.scheduler.reduction_factor, stop_last_trials=False)


def _largest(tc: TuneConfig, base: dict, key: str) -> float:
    """The largest value a trial may give `key` (for resources: the hungriest trial must fit)."""
    values = [get_key(base, key)]
    if key in tc.space:
        values += tc.space[key].values_to_check()
    values += [p[key] for p in tc.trials if key in p]
    flat = [x for v in values if v is not None for x in (v if isinstance(v, list) else [v])]  # elastic [min, max]
    return max(float(v) for v in flat)


def default_concurrency(resources: dict, workers: float, cpus_per_worker: float, use_gpu: bool | None) -> int:
    """Trials at once: whole trials that fit the cluster's GPUs (one per worker), or its CPUs without GPUs."""
    # Each trial also holds TRIAL_CPU for its Tune actor: 4 CPUs fit 3 one-worker trials, not 4 (the 4th
    # trainer would wait for a CPU until its worker group start times out).
    by_cpu = int(resources.get("CPU", 1) // (workers * cpus_per_worker + TRIAL_CPU))
    gpus = resources.get("GPU", 0)
    if gpus >= 1 and use_gpu is not False:
        return max(1, min(int(gpus // workers), by_cpu))
    return max(1, by_cpu)


# --- one trial ---------------------------------------------------------------------------------------------------

class StudyReportCallback(TuneReportCallback):
    """TuneReportCallback that adds OBJECTIVE to every report: the latest eval loss (carried between eval steps,
    NaN before the first; ASHA and Tune's metric check need the metric in every result), DIVERGED_OBJECTIVE once
    the loop reports `diverged`."""

    def __init__(self, metric: str = "eval_loss"):
        super().__init__()
        self.metric = metric
        self.latest = math.nan

    def after_report(self, run_context, metrics, checkpoint):
        rank0 = dict(metrics[0])
        if rank0.get(self.metric) is not None:
            self.latest = float(rank0[self.metric])
        rank0[OBJECTIVE] = DIVERGED_OBJECTIVE if rank0.get("diverged") else self.latest
        super().after_report(run_context, [rank0, *metrics[1:]], checkpoint)


def trial_dir(study_dir: Path | str, trial_id: str) -> Path:
    return RunLayout(study_dir).trial(trial_id)


def run_trial(params: dict, base: dict, manifest: str, pretrained: str) -> None:
    """Tune's trial function: train the job with `params` set; divergence is a result (a metric), not an error."""
    # imported here for start-up time: driver.training loads torch
    from raytune_sd3.driver.training import build_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = job_for_params(base, params, trial_dir(base["output_dir"], trial_id))
    write_job(cfg)
    metric = (base.get("tune") or {}).get("metric", "eval_loss")
    # A trial restarted by --resume finds its Train run in <trial>/ray and continues from the last checkpoint.
    build_trainer(cfg, Path(manifest), pretrained, callbacks=[StudyReportCallback(metric)]).fit()
    # No LoRA export here: ASHA's last rung is max_steps, and Tune may stop the trial right after that report,
    # before fit() returns. The driver copies each stable trial's LoRA instead (keep_final_loras).


# --- the study -----------------------------------------------------------------------------------------------------

def experiment_path(cfg: JobConfig) -> Path:
    """Where Tune keeps the study's state (what --resume restores): the job's run folder, as for a training run."""
    return RunLayout.of(cfg).run_dir


def run_study(cfg: JobConfig, manifest: Path, pretrained: str, resume: bool = False,
              retry_failed: bool = False, verbose: bool = False) -> Path:
    """Run the study (or, with resume, continue the one in experiment_path); returns experiment_path."""
    import ray

    tc = study_config(cfg)
    base = study_base(cfg)
    path = experiment_path(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, manifest=str(manifest), pretrained=pretrained),
        {"cpu": TRIAL_CPU})
    # Save the study state every few seconds (Tune's "auto" waits longer): a killed driver then loses little.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    # Explicit trials set keys that are constants in the space; Tune warns for each, harmlessly.
    logging.getLogger("ray.tune.search.variant_generator").setLevel(logging.ERROR)
    if resume and tune.Tuner.can_restore(path):
        log.info("resuming the study in %s (finished trials are kept)", path)
        # resume_errored, not restart_errored: Tune's restart replaces a failed trial with a new one (new trial id,
        # new folder, from step 0) and drops the failed one from the study; a resumed one keeps its id and folder,
        # and its TorchTrainer continues from the trial's last checkpoint.
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=retry_failed)
    else:
        concurrency = tc.max_concurrent_trials or default_concurrency(
            ray.cluster_resources(), _largest(tc, base, "train.num_workers"),
            _largest(tc, base, "train.cpus_per_worker"), cfg.train.use_gpu)
        log.info("study %s: %s trials, %d at a time", cfg.run_name, tc.total_trials or "grid", concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(tc, base),
            tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="min",
                                        search_alg=make_search_alg(tc, base, concurrency),
                                        scheduler=make_asha(tc, cfg.train.max_steps),
                                        num_samples=tc.total_trials or 1),
            run_config=tune.RunConfig(name=cfg.run_name, storage_path=str(path.parent), verbose=2 if verbose else 0,
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
        )
    tuner.fit()  # failed trials are results too: fit() returns them instead of raising
    return path


def trials_left(cfg: JobConfig) -> bool:
    """Whether `--resume` (without --retry-failed) would run anything: the saved study has a trial still to create
    or one that has not ended. Read from Tune's saved state, without Ray. A grid's size is not counted: True."""
    from ray.tune import ExperimentAnalysis

    path, total = experiment_path(cfg), study_config(cfg).total_trials
    if total is None or not tune.Tuner.can_restore(path):
        return True
    trials = ExperimentAnalysis(str(path)).trials
    return len(trials) < total or any(t.status not in ENDED for t in trials)


def collect_trials(cfg: JobConfig, path: Path | None = None) -> list[TrialRecord]:
    """Every trial of the study as a TrialRecord (read from Tune's saved state, so it works after a crash too)."""
    from ray.tune import ExperimentAnalysis

    tc = study_config(cfg)
    analysis = ExperimentAnalysis(str(path or experiment_path(cfg)))
    records = []
    for t in sorted(analysis.trials, key=lambda t: t.trial_id):
        df = analysis.trial_dataframes.get(t.trial_id)
        results = df.to_dict("records") if df is not None and len(df) else [t.last_result or {}]
        error = ""
        if t.status == "ERROR":
            text = str(t.get_error() or "").strip().splitlines()
            error = next((ln.strip() for ln in reversed(text) if ln.strip()), "error")[:300]
        out = trial_dir(cfg.output_dir, t.trial_id)
        records.append(trial_record(t.trial_id, {k: t.config.get(k) for k in tc.keys}, t.status, results, error,
                                    cfg.train.max_steps, str(out), read_initial_eval(out)))
    return records


def keep_final_loras(records: list[TrialRecord]) -> int:
    """Copy each stable trial's final LoRA from its last Train checkpoint into its folder; returns how many."""
    # imported here for start-up time: train.checkpoint loads torch
    from raytune_sd3.train.checkpoint import copy_final_lora

    copied = 0
    for r in records:
        src = RunLayout(r.final_checkpoint or "").lora  # a checkpoint holds the LoRA under the same name
        if r.status == "stable" and r.final_checkpoint and src.exists() and not RunLayout(r.output_dir).lora.exists():
            copy_final_lora(r.final_checkpoint, r.output_dir)
            copied += 1
    return copied
