"""What every command (train, tune, cache, check; hub and convert for their parser) shares: its arguments, reading the job, joining Ray with the job
fitted to the cluster, and how an error is shown. Each `python -m raytune_sd3.X` is a thin shell over these."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from raytune_sd3 import atomic
from raytune_sd3.config import ConfigError, JobConfig, load_job, one_screen, redact
from raytune_sd3.driver.preflight import check_paths
from raytune_sd3.run_layout import RunLayout

log = logging.getLogger("raytune_sd3")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose own messages ("unrecognized arguments: ...", a bad --gpu) quote the command line: secrets
    are redacted and the message kept to one screen, as for every other error."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {one_screen(message, max_lines=8)}\n")


def command_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A command's parser: its module docstring as the help text (line breaks kept), argparse's own messages
    redacted and on one screen. Each command adds only its own arguments."""
    return ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def job_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """command_parser with the arguments every command on a job shares: the job file, --data, --set, --verbose."""
    p = command_parser(prog, doc)
    p.add_argument("job", help="job YAML, e.g. jobs/tiny.yaml")
    p.add_argument("--data", metavar="DIR", help="train on this folder of images instead of the job's data sets "
                   "(captions from a .txt beside each image, else the file name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.learning_rate=1e-5 (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (its workers, Ray Data, Ray Train) here instead of in output_dir/ray.log")
    return p


def read_job(args: argparse.Namespace, paths: bool = True, preflight: bool = False) -> JobConfig:
    """The job of the command line, validated, its paths checked (`paths`), and with `preflight` everything else
    `python -m raytune_sd3.check` would refuse it for (train and tune: before Ray starts); raises ConfigError."""
    cfg = load_job(args.job, args.overrides, data_dir=args.data)
    if paths:
        try:
            check_paths(cfg)
        except ConfigError as e:  # FILE: KEY: ..., as the schema's errors
            raise ConfigError(f"{args.job}: {e}") from None
    if preflight:
        from raytune_sd3.driver.checks import refuse_early

        refuse_early(cfg)
    return cfg


def connect(cfg: JobConfig, place: bool = True, verbose: bool = False):
    """Join or start Ray (its output to output_dir/ray.log unless `verbose`), then fit the job to the cluster
    (`auto` settings; with `place`, workers the cluster can never hold raise PlacementError, and bitsandbytes parts
    on a cluster without GPUs a ConfigError). Returns the Cluster."""
    from raytune_sd3.driver import console
    from raytune_sd3.driver.placement import fit_to_cluster, read_cluster, resolve_auto
    from raytune_sd3.driver.runtime import init_ray

    if verbose:
        init_ray(cfg)
    else:
        path = console.ray_log_to_file(Path(cfg.output_dir))
        init_ray(cfg, configure_logging=False)
        console.route_worker_output(path)
        log.info("Ray's own output: %s (--verbose shows it here)", path)
    console.ray_progress_bars(verbose)
    if place:
        from raytune_sd3.driver.preflight import needs_cuda_problem

        cluster = fit_to_cluster(cfg)
        if (problem := needs_cuda_problem(cfg)) is not None:  # nf4 / 8-bit optimizers, and the cluster has no GPU
            raise ConfigError(problem)
        return cluster
    cluster = read_cluster(cfg)
    resolve_auto(cfg, cluster)
    return cluster


def run(main: Callable[[], int], verbose: bool = False) -> int:
    """Run a command's body: a ConfigError (a job that cannot run) is one message and exit status 2."""
    from raytune_sd3.driver.console import setup_logging

    setup_logging(verbose)
    try:
        return main()
    except ConfigError as e:
        print(f"error: {one_screen(str(e))}", file=sys.stderr)
        return 2


def report_failure(error: BaseException, out: Path, what: str = "training") -> int:
    """The error's first lines on screen, the whole of it in output_dir/error.log (secrets stripped); returns 1."""
    text = redact("".join(traceback.format_exception(error)))
    log_file = atomic.write_text(RunLayout(out).error_log, text)
    lines = [ln for ln in redact(str(error)).splitlines() if ln.strip()]
    print(f"error: {what} failed: " + "\n  ".join(lines[:6]) + ("\n  ..." if len(lines) > 6 else ""),
          file=sys.stderr)
    print(f"the whole error: {log_file}", file=sys.stderr)
    return 1
