"""python -m raytune_sd3.train JOB.yaml [--data DIR] [--set key=value ...] [--restart]

Validate the job -> start/join Ray, fitted to the cluster -> fill the cache (Ray Data) -> train a LoRA (Ray Train
TorchTrainer) -> copy the final LoRA into output_dir, write its model card (README.md), upload both when
hub.repo_id is set. Exit status: 0 done, 1 failed, 2 a job that cannot run, 3 diverged, 4 trained but the Hub
upload failed (the LoRA and card are in output_dir; retry: python -m raytune_sd3.hub OUTPUT_DIR). (The driver's
side of it: raytune_sd3/driver/training.py.)
"""

from __future__ import annotations

import sys

from raytune_sd3.driver import cli


def main(argv: list[str] | None = None) -> int:
    p = cli.job_parser("python -m raytune_sd3.train", __doc__)
    p.add_argument("--restart", action="store_true",
                   help="discard this run's earlier checkpoints in output_dir instead of resuming from them")
    args = p.parse_args(argv)

    def body() -> int:
        cfg = cli.read_job(args, preflight=True)  # a job `check` refuses stops here, in its words, before Ray starts
        # imported here for start-up time: driver.training loads torch
        from raytune_sd3.driver.training import train_job

        return train_job(cfg, restart=args.restart, verbose=args.verbose)

    return cli.run(body, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
