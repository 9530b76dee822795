"""python -m raytune_sd3.tune JOB.yaml [--set key=value ...] [--resume | --restart] [--retry-failed] [--report-only]

A stability study: validate the job and its `tune:` section -> start/join Ray -> fill the cache once (Ray Data)
-> run the trials with Ray Tune (each a Ray Train TorchTrainer; ASHA on the eval loss; divergence recorded, not
raised) -> write trials.csv, trials.md, eval_loss.png, stability.png and best.yaml into output_dir.

Exit status: 0 with a best.yaml, 3 when no trial was stable, 2 for a job that cannot run, 1 for other errors.
(Driving the study from the job: raytune_sd3/tune/run.py.)
"""

from __future__ import annotations

import argparse
import sys

from raytune_sd3.driver import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.job_parser("python -m raytune_sd3.tune", __doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the study in output_dir: finished trials are kept, the others run")
    mode.add_argument("--restart", action="store_true",
                      help="discard the study in output_dir (trials and Tune state; the cache stays) and start over")
    mode.add_argument("--report-only", action="store_true",
                      help="rewrite the table, plots and best.yaml from the study in output_dir; train nothing")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: also rerun failed trials, each from its last checkpoint")
    args = p.parse_args(argv)
    if args.retry_failed and not args.resume:
        p.error("--retry-failed goes with --resume")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        from raytune_sd3.tune.config import check_study

        cfg = cli.read_job(args, preflight=not args.report_only)
        check_study(cfg)  # no Ray or torch yet: a bad study fails in about a second
        from raytune_sd3.config import load_recorded_job
        from raytune_sd3.driver.placement import resolve_as_saved
        from raytune_sd3.driver.resume import guard_study
        from raytune_sd3.run_layout import RunLayout
        from raytune_sd3.tune.run import report, study_job
        from raytune_sd3.tune.study import trials_left

        if args.report_only or (args.resume and not args.retry_failed and not trials_left(cfg)):
            guard_study(cfg, resume=False, restart=False, report_only=True)
            saved = RunLayout.of(cfg).job
            if saved.is_file():  # the study's `auto` choices, so best.yaml says what the trials ran with
                resolve_as_saved(cfg, load_recorded_job(saved, cfg))
            if args.resume:  # every trial has ended: nothing to run, so no Ray; the same job, as --resume demands
                guard_study(cfg, resume=True, restart=False, report_only=False)
                print("every trial of the study has ended: nothing to resume (the report is written again)")
            return 0 if report(cfg)["best"] else 3
        return study_job(cfg, resume=args.resume, restart=args.restart, retry_failed=args.retry_failed,
                         verbose=args.verbose)

    return cli.run(body, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
