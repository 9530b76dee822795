"""python -m raytune_sd3.train JOB.yaml [--set key=value ...]

Validate the job -> start/join Ray -> fill the cache (Ray Data) -> train a LoRA (Ray Train TorchTrainer) ->
copy the final LoRA into output_dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from raytune_sd3.config import ConfigError, JobConfig, check_paths, dump_job, load_job, redact
from raytune_sd3.models.lora import LORA_FILE

log = logging.getLogger("raytune_sd3")


def job_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The arguments every entry point shares: the job file, --data and --set."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="job YAML, e.g. jobs/tiny.yaml")
    p.add_argument("--data", metavar="DIR", help="train on this folder of images instead of the job's data sets "
                   "(captions from a .txt beside each image, else the file name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.learning_rate=1e-5 (repeatable)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser("python -m raytune_sd3.train", __doc__)
    p.add_argument("--restart", action="store_true",
                   help="discard this run's earlier checkpoints in output_dir instead of resuming from them")
    return p.parse_args(argv)


def build_trainer(cfg: JobConfig, manifest: Path, pretrained: str, callbacks: list | None = None,
                  storage_path: str | None = None):
    """The TorchTrainer for this job (Tune trials build theirs here too, with TuneReportCallback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytune_sd3.placement import ensure_resolved
    from raytune_sd3.train.backend import WorkerTorchConfig
    from raytune_sd3.train.faults import StopOnRepeatedError
    from raytune_sd3.train.loop import train_loop_per_worker

    ensure_resolved(cfg)
    t = cfg.train
    storage = storage_path or str(Path(cfg.output_dir).resolve() / "ray")
    # Checkpoints on a local storage path are also looked up by the workers directly (train/state.py).
    run_dir = None if "://" in storage else str(Path(storage) / cfg.run_name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "manifest": str(manifest), "pretrained": pretrained,
                           "run_dir": run_dir},
        torch_config=WorkerTorchConfig(),
        scaling_config=ScalingConfig(num_workers=tuple(t.num_workers) if t.elastic else t.num_workers,
                                     use_gpu=bool(t.use_gpu), resources_per_worker={"CPU": t.cpus_per_worker},
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[StopOnRepeatedError(), *(callbacks or [])],
        ),
    )
    return trainer


# Keys that may change between a run and its resumption; any other change means a different run.
RESUMABLE_CHANGES = {"max_steps", "checkpoint_every", "keep_checkpoints", "max_failures", "eval_every",
                     "max_nonfinite_steps", "divergence_factor", "grad_norm_limit"}
SETTINGS_FILE = "raytune_sd3_settings.json"


def run_settings(cfg: JobConfig) -> dict:
    """The settings that define a run's trajectory (what a resumed run must share with the one it continues)."""
    d = cfg.model_dump(mode="json", include={"model", "text", "data", "flow", "lora", "train"})
    d["train"] = {k: v for k, v in d["train"].items() if k not in RESUMABLE_CHANGES}
    for k in ("encode_batch_size", "encode_actors"):
        d["data"].pop(k)
    return d


def guard_resume(cfg: JobConfig, restart: bool) -> None:
    """Refuse to silently continue an earlier run in output_dir that had other settings; --restart starts over."""
    run_dir = Path(cfg.output_dir) / "ray" / cfg.run_name
    if restart and run_dir.exists():
        shutil.rmtree(run_dir)
    settings = redact(run_settings(cfg))  # a file beside the checkpoints: no secret in it (or in the error below)
    path = run_dir / SETTINGS_FILE
    if path.exists():
        old = json.loads(path.read_text())
        diffs = [f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {v!r}" for sec, vals in settings.items()
                 for k, v in vals.items() if old.get(sec, {}).get(k) != v]
        if diffs:
            raise ConfigError(
                f"{run_dir} holds a run with other settings, which this job would resume:\n  " + "\n  ".join(diffs)
                + "\nUse another output_dir or name for a new run, or pass --restart to discard the old one.")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def export_lora(result, output_dir: Path) -> Path:
    """Copy the last checkpoint's LoRA into output_dir (atomically)."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; see the Ray Train logs above")
    with result.checkpoint.as_directory() as folder:
        dest = output_dir / LORA_FILE
        tmp = output_dir / f".{LORA_FILE}.tmp"
        shutil.copyfile(Path(folder) / LORA_FILE, tmp)
        os.replace(tmp, dest)
    return dest


def report_failure(error: BaseException, out: Path) -> int:
    """The error's first lines on screen, the whole of it in output_dir/error.log; exit status 1."""
    import traceback

    from raytune_sd3.config import redact

    text = redact("".join(traceback.format_exception(error)))
    log_file = out / "error.log"
    log_file.write_text(text)
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    print("error: training failed: " + "\n  ".join(lines[:6]) + ("\n  ..." if len(lines) > 6 else ""), file=sys.stderr)
    print(f"the whole error: {log_file}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_job(args.job, args.overrides, data_dir=args.data)
        check_paths(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from raytune_sd3.data.prepare import prepare_data
    from raytune_sd3.models.loading import resolve_pretrained
    from raytune_sd3.placement import WaitReporter, fit_to_cluster
    from raytune_sd3.runtime import init_ray

    t0 = time.perf_counter()
    init_ray(cfg)
    try:
        fit_to_cluster(cfg)  # `auto` settings from the cluster; workers it can never place stop the job here
        guard_resume(cfg, args.restart)  # after fit_to_cluster: a resumed run must resolve `auto` the same way
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.yaml").write_text(dump_job(cfg))
    pretrained = resolve_pretrained(cfg.model.pretrained)
    manifest, report = prepare_data(cfg, pretrained)
    log.info("cache: %d items (%d latents encoded, %d reused; %d captions encoded, %d reused; %d skipped) in %.1fs",
             len(report.rows), report.latents_encoded, report.latents_reused, report.texts_encoded,
             report.texts_reused, len(report.skipped), report.seconds)
    try:
        with WaitReporter(cfg):
            result = build_trainer(cfg, manifest, pretrained).fit()
        error = result.error
    except Exception as e:  # noqa: BLE001 - Ray Train raises what stopped the run; the user gets it in short
        error = e
    if error:
        return report_failure(error, out)
    # Train V2's result.metrics are those of the last checkpoint, and a diverged step writes none: read the log.
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    last = json.loads(lines[-1]) if lines else {}
    if last.get("diverged"):
        print(f"error: training diverged at step {last['step']}: {last['diverged_reason']}. "
              "Lower train.learning_rate or train.max_grad_norm (see metrics.jsonl).", file=sys.stderr)
        return 3
    lora = export_lora(result, out)
    log.info("done in %.0fs: %s", time.perf_counter() - t0, lora)
    return 0


if __name__ == "__main__":
    sys.exit(main())
