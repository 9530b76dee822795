"""A stability study on the driver: the job fitted to the cluster, the cache filled once for every trial, the
trials run by Ray Tune (raytune_sd3/tune/study.py builds them), then the table, plots and best.yaml.

    job -> Ray, fitted to the cluster (one trial's workers) -> study guard -> job.yaml -> cache (once)
        -> Tuner.fit() -> report: exit status 0 with a best.yaml, 3 when no trial was stable
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from raytune_sd3.config import JobConfig
from raytune_sd3.driver.resume import guard_study
from raytune_sd3.run_layout import RunLayout, write_job

log = logging.getLogger("raytune_sd3")


def report(cfg: JobConfig) -> dict:
    """Collect every trial, copy the stable ones' LoRAs out, write the table, plots and best.yaml; print where."""
    # imported here for start-up time: tune.study loads ray
    from raytune_sd3.tune.config import study_base, study_config
    from raytune_sd3.tune.report import summary, write_report
    from raytune_sd3.tune.study import collect_trials, keep_final_loras

    records = collect_trials(cfg)
    keep_final_loras(records)
    paths = write_report(study_base(cfg), records, study_config(cfg).keys, Path(cfg.output_dir), cfg.run_name)
    print(summary(records))
    print(f"table: {paths['md']}  plots: {paths['curves']}, {paths['map']}")
    if paths["best"]:
        print(f"best job: {paths['best']}  (python -m raytune_sd3.train {paths['best']})")
    if any(r.status == "unfinished" for r in records):
        print("some trials are unfinished: run the same command with --resume to complete them")
    if any(r.status == "failed" for r in records):  # --resume alone keeps them failed: say how to rerun them
        print("some trials failed (see the note in the table): run the same command with --resume --retry-failed "
              "to rerun them")
    return paths



def study_job(cfg: JobConfig, resume: bool = False, restart: bool = False, retry_failed: bool = False,
              verbose: bool = False) -> int:
    """The whole study command on a validated job; returns the exit status."""
    # imported here for start-up time: driver.caching, testmodels.resolve, tune.study load torch and ray
    from raytune_sd3.driver.caching import prepare_data
    from raytune_sd3.driver.cli import connect
    from raytune_sd3.driver.placement import WaitReporter
    from raytune_sd3.testmodels.resolve import resolve_pretrained, resolve_validation_models
    from raytune_sd3.tune.study import run_study

    t0 = time.perf_counter()
    pretrained = resolve_pretrained(cfg.model.pretrained)  # before Ray, as in driver/training.py
    resolve_validation_models(cfg)
    cluster = connect(cfg, verbose=verbose)  # one trial's workers; `auto` resolved before the resume guard compares settings
    from raytune_sd3.driver.checks import refuse_on_cluster

    refuse_on_cluster(cfg, cluster)  # as in driver/training.py
    guard_study(cfg, resume, restart, report_only=False)
    layout = RunLayout.of(cfg)
    write_job(cfg)
    manifest = layout.manifest
    if resume and not manifest.exists() and layout.legacy_manifest.exists():
        manifest = layout.legacy_manifest  # a study begun by an earlier version: its JSON manifest is read as it is
    if resume and manifest.exists():
        # The study's trials were compared on this cache and eval set: a resumed study keeps them as they were.
        log.info("resume: reusing %s (the cache is not touched)", manifest)
    else:
        manifest, rep = prepare_data(cfg, pretrained)  # once for the whole study: trials only read the cache
        log.info("cache: %d items (%d latents encoded, %d reused) in %.1fs", len(rep.rows), rep.latents_encoded,
                 rep.latents_reused, rep.seconds)
    with WaitReporter(cfg):
        run_study(cfg, manifest, pretrained, resume=resume, retry_failed=retry_failed, verbose=verbose)
    paths = report(cfg)
    log.info("study done in %.0fs", time.perf_counter() - t0)
    return 0 if paths["best"] else 3

