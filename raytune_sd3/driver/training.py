"""Training a job: its TorchTrainer (which Tune trials build too), the whole `python -m raytune_sd3.train` run, and
the final LoRA copied out of the last checkpoint.

    job -> Ray, fitted to the cluster -> resume guard -> job.yaml -> cache (Ray Data) -> TorchTrainer.fit()
        -> the LoRA and its model card in output_dir (uploaded to the Hub with hub.repo_id: raytune_sd3/hub/publish.py)
        -> exit status: 0 done, 4 done but the upload failed, 3 diverged, 1 failed
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from raytune_sd3.config import JobConfig
from raytune_sd3.driver.resume import finished_run, guard_resume, validation_changes
from raytune_sd3.run_layout import CURVES, RunLayout, write_job

log = logging.getLogger("raytune_sd3")


def build_trainer(cfg: JobConfig, manifest: Path, pretrained: str, callbacks: list | None = None,
                  revalidate: bool = False):
    """The TorchTrainer for this job (Tune trials build theirs here too, with TuneReportCallback). `revalidate`: a
    finished run resumed only to validate its final LoRA again (train/loop.py)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # imported here for start-up time: driver.backend, driver.faults, testmodels.resolve, train.loop load torch and ray
    from raytune_sd3.driver.backend import WorkerTorchConfig
    from raytune_sd3.driver.faults import StopOnRepeatedError
    from raytune_sd3.driver.placement import ensure_resolved
    from raytune_sd3.testmodels.resolve import resolve_validation_models
    from raytune_sd3.train.loop import train_loop_per_worker

    ensure_resolved(cfg)
    t = cfg.train
    layout = RunLayout.of(cfg)  # output_dir is absolute (config.py resolves it): the workers read the same folder
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "manifest": str(manifest), "pretrained": pretrained,
                           "run_dir": str(layout.run_dir), "revalidate": revalidate, **resolve_validation_models(cfg)},
        torch_config=WorkerTorchConfig(),
        scaling_config=ScalingConfig(num_workers=tuple(t.num_workers) if t.elastic else t.num_workers,
                                     use_gpu=bool(t.use_gpu), resources_per_worker={"CPU": t.cpus_per_worker},
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=str(layout.ray_storage),
            # A node reclaimed after a drain notice (spot) restarts the run without using up max_failures, which is
            # for real failures: Ray Train counts those restarts apart (train/loop.py checkpoints at the notice).
            failure_config=FailureConfig(max_failures=t.max_failures, max_preemption_failures=-1),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[StopOnRepeatedError(), *(callbacks or [])],
        ),
    )


def last_metrics(out: Path) -> dict:
    """The last line of output_dir/metrics.jsonl ({} before the first)."""
    path = RunLayout(out).metrics
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def write_curves(out: Path) -> Path | None:
    """output_dir/curves.png (loss and CLIP score) from metrics.jsonl; a plot that fails is logged, never fatal."""
    from raytune_sd3.driver.curves import plot_training_curves

    layout = RunLayout(out)
    try:
        return plot_training_curves(layout.metrics, layout.curves)
    except Exception as e:  # noqa: BLE001 - a picture must not turn a finished run into a failed one
        log.warning("could not draw %s: %s: %s", CURVES, type(e).__name__, e)
        return None


def set_aside_error_log(out: Path) -> None:
    """An error.log of an earlier, failed attempt is moved aside (error.previous.log) once a run succeeds, so the
    folder of a finished run does not read as a failed one."""
    layout = RunLayout(out)
    if layout.error_log.is_file():
        layout.error_log.replace(layout.previous_error_log)
        log.info("%s of an earlier attempt moved to %s", layout.error_log, layout.previous_error_log)


def train_job(cfg: JobConfig, restart: bool = False, verbose: bool = False) -> int:
    """The whole training command on a validated job; returns the exit status."""
    # imported here for start-up time: driver.caching, testmodels.resolve load torch
    from raytune_sd3.driver.caching import prepare_data
    from raytune_sd3.driver.cli import connect, report_failure
    from raytune_sd3.driver.console import TrainingProgress
    from raytune_sd3.driver.placement import WaitReporter
    from raytune_sd3.testmodels.resolve import resolve_pretrained, resolve_validation_models

    t0 = time.perf_counter()
    revalidate = False
    if not restart and (finished := finished_run(cfg)) is not None:  # seconds, not a Ray start and a worker group
        if not (changes := validation_changes(cfg)):
            log.info("already trained: step %d of %d, LoRA %s (raise train.max_steps to train on, or --restart to "
                     "train again)", finished[0], cfg.train.max_steps, finished[1])
            return 0
        revalidate = True
        log.info("already trained (step %d); validating its final LoRA again with the changed validation settings, "
                 "without training:\n  %s", finished[0], "\n  ".join(changes))
        if any(c.startswith("validation.every_steps") for c in changes):
            log.info("validation.every_steps: the images of earlier steps need the training again (--restart); "
                     "only the final step is validated now")
    # Before Ray, as the CLI always did: in test_cluster's two-node `ray job submit`, os.getcwd() failed after
    # ray.init() (the entrypoint's working directory was gone), and the tiny builder's imports read it.
    pretrained = resolve_pretrained(cfg.model.pretrained)
    resolve_validation_models(cfg)  # the tiny CLIP / TAESD built now, for the same reason
    cluster = connect(cfg, verbose=verbose)  # `auto` settings from the cluster; workers it can never place stop the job here
    from raytune_sd3.driver.checks import refuse_on_cluster

    refuse_on_cluster(cfg, cluster)  # on a cluster: its worker count is known only now, and nothing is cached yet
    guard_resume(cfg, restart)  # after connect: a resumed run must resolve `auto` the same way
    layout = RunLayout.of(cfg)
    out = layout.output_dir
    write_job(cfg)
    manifest, report = prepare_data(cfg, pretrained)
    log.info("cache: %d items (%d latents encoded, %d reused; %d captions encoded, %d reused; %d skipped) in %.1fs",
             len(report.rows), report.latents_encoded, report.latents_reused, report.texts_encoded,
             report.texts_reused, len(report.skipped), report.seconds)
    try:
        with WaitReporter(cfg), TrainingProgress(out, cfg.train.max_steps):
            result = build_trainer(cfg, manifest, pretrained, revalidate=revalidate).fit()
        error = result.error
    except Exception as e:  # noqa: BLE001 - Ray Train raises what stopped the run; the user gets it in short
        error = e
    write_curves(out)
    if error:
        return report_failure(error, out)
    set_aside_error_log(out)
    # Train V2's result.metrics are those of the last checkpoint, and a diverged step writes none: read the log.
    last = last_metrics(out)
    if last.get("diverged"):
        print(f"error: training diverged at step {last['step']}: {last['diverged_reason']}. "
              "Lower train.learning_rate or train.max_grad_norm (see metrics.jsonl).", file=sys.stderr)
        return 3
    if result.checkpoint is None:
        return report_failure(RuntimeError("training finished without a checkpoint"), out)
    from raytune_sd3.train.checkpoint import copy_final_lora  # imported here for start-up time: it loads torch

    with result.checkpoint.as_directory() as folder:
        lora = copy_final_lora(folder, out)
    images = layout.validation_steps()
    log.info("done in %.0f s. LoRA: %s\n  metrics: %s (%s)%s", time.perf_counter() - t0, lora, layout.metrics, CURVES,
             f"\n  validation images: {images[-1]}" if images else "")
    # imported here for start-up time: hub.publish loads torch
    from raytune_sd3.hub.publish import publish

    return publish(cfg, out, last.get("step"))  # the model card, and the upload: 4 if that failed, never lost
