"""python -m raytune_sd3.tune JOB.yaml [--set key=value ...] [--resume | --restart] [--retry-failed] [--report-only]

A stability study: validate the job and its `tune:` section -> start/join Ray -> fill the cache once (Ray Data)
-> run the trials with Ray Tune (each a Ray Train TorchTrainer; ASHA on the eval loss; divergence recorded, not
raised) -> write trials.csv, trials.md, eval_loss.png, stability.png and best.yaml into output_dir.

Exit status: 0 with a best.yaml, 3 when no trial was stable, 2 for a job that cannot run, 1 for other errors.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import yaml

from raytune_sd3.config import ConfigError, JobConfig, check_paths, dump_job, load_job
from raytune_sd3.tune.config import check_study

log = logging.getLogger("raytune_sd3")
REPORT_FILES = ("trials.csv", "trials.md", "eval_loss.png", "stability.png", "best.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from raytune_sd3.train.__main__ import job_parser

    p = job_parser("python -m raytune_sd3.tune", __doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the study in output_dir: finished trials are kept, the others run")
    mode.add_argument("--restart", action="store_true",
                      help="discard the study in output_dir (trials and Tune state; the cache stays) and start over")
    mode.add_argument("--report-only", action="store_true",
                      help="rewrite the table, plots and best.yaml from the study in output_dir; train nothing")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: also rerun failed trials")
    args = p.parse_args(argv)
    if args.retry_failed and not args.resume:
        p.error("--retry-failed goes with --resume")
    return args


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def guard_study(cfg: JobConfig, resume: bool, restart: bool, report_only: bool) -> None:
    """Refuse to mix two studies in one output_dir: an existing one is resumed (same job), restarted or reported."""
    from ray import tune

    from raytune_sd3.tune.study import experiment_path

    out, path = Path(cfg.output_dir), experiment_path(cfg)
    exists = tune.Tuner.can_restore(path)
    if report_only:
        if not exists:
            raise ConfigError(f"{path}: no study to report on")
        return
    if restart:
        for p in (path, out / "trials"):
            shutil.rmtree(p, ignore_errors=True)
        for name in REPORT_FILES:
            (out / name).unlink(missing_ok=True)
        return
    if exists and not resume:
        raise ConfigError(f"{out} already holds a study ({path}). Pass --resume to continue it, --restart to "
                          "discard it, or use another output_dir.")
    saved = out / "job.yaml"
    if exists and saved.exists():
        old, new = _flat(yaml.safe_load(saved.read_text())), _flat(yaml.safe_load(dump_job(cfg)))
        # Keys in one dump only are fields a code update added or removed, not a change of this study.
        diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
                 if old[k] != new[k] and not k.startswith("ray.")]
        if diffs:
            raise ConfigError(f"--resume: the study in {out} ran with other settings:\n  " + "\n  ".join(diffs)
                              + "\nResume with the same job, or pass --restart to start over.")


def report(cfg: JobConfig) -> dict:
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
    return paths


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_job(args.job, args.overrides, data_dir=args.data)
        check_paths(cfg)
        check_study(cfg)  # no Ray yet: a bad study fails in about a second
        if args.report_only:
            guard_study(cfg, args.resume, args.restart, args.report_only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.report_only:
        return 0 if report(cfg)["best"] else 3

    from raytune_sd3.data.prepare import prepare_data
    from raytune_sd3.data.reader import MANIFEST
    from raytune_sd3.models.loading import resolve_pretrained
    from raytune_sd3.placement import WaitReporter, fit_to_cluster
    from raytune_sd3.runtime import init_ray
    from raytune_sd3.tune.study import run_study

    t0 = time.perf_counter()
    init_ray(cfg)
    try:
        fit_to_cluster(cfg)  # one trial's workers; `auto` resolved before the resume guard compares settings
        guard_study(cfg, args.resume, args.restart, args.report_only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.yaml").write_text(dump_job(cfg))
    pretrained = resolve_pretrained(cfg.model.pretrained)
    manifest = out / MANIFEST
    if args.resume and manifest.exists():
        # The study's trials were compared on this cache and eval set: a resumed study keeps them as they were.
        log.info("resume: reusing %s (the cache is not touched)", manifest)
    else:
        manifest, rep = prepare_data(cfg, pretrained)  # once for the whole study: trials only read the cache
        log.info("cache: %d items (%d latents encoded, %d reused) in %.1fs", len(rep.rows), rep.latents_encoded,
                 rep.latents_reused, rep.seconds)
    with WaitReporter(cfg):
        run_study(cfg, manifest, pretrained, resume=args.resume, retry_failed=args.retry_failed)
    paths = report(cfg)
    log.info("study done in %.0fs", time.perf_counter() - t0)
    return 0 if paths["best"] else 3


if __name__ == "__main__":
    sys.exit(main())
