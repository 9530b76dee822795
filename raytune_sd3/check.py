"""python -m raytune_sd3.check JOB.yaml [--cluster cluster/aws-h100.yaml] [--set key=value ...]

A preflight that runs in seconds with no GPU, before GPU hours are spent: validates the job, checks that its data
and model are reachable from where it runs (run it on the cluster's head for /mnt/shared paths), counts images and
buckets, and estimates per-GPU memory (model size, dtype, quantisation, DDP or ZeRO-2/3, batch, resolution, T5
length) against the GPU of the cluster's worker node type (or `--gpu`: a card, or a size such as 12GB): it says
"fits", or what to change.

Exit status: 0 all good, 1 something to fix (listed), 2 the job file or the cluster file itself is invalid.
"""

from __future__ import annotations

import argparse
import sys

from raytune_sd3.cluster_files import ClusterFileError, read_cluster_file
from raytune_sd3.config import ConfigError, load_job, one_screen
from raytune_sd3.driver.checks import run_checks
from raytune_sd3.hardware import GPU_GIB, gpu_memory
from raytune_sd3.memory import QUANT_BYTES, STRATEGIES


def _gpu(spec: str) -> str:
    try:
        gpu_memory(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from raytune_sd3.driver.cli import job_parser

    p = job_parser("python -m raytune_sd3.check", __doc__)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster", help="cluster file whose GPU worker type to check against "
                                         "(cluster/*.yaml: launcher YAML or KubeRay manifest)")
    where.add_argument("--gpu", type=_gpu, metavar="CARD|SIZE",
                       help="check against one GPU instead of a cluster file: a card (" + ", ".join(sorted(GPU_GIB))
                       + ") or a memory size such as 12GB (read as GiB, what a 12 GB consumer card has)")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="what-if: DDP or DeepSpeed ZeRO-2/3 (default: the job's train.strategy)")
    p.add_argument("--quantization", choices=sorted(QUANT_BYTES), default=None,
                   help="what-if: a quantised base (default: the job's model.quantize)")
    p.add_argument("--skip-paths", action="store_true",
                   help="only the config and memory checks (e.g. on a laptop that does not mount /mnt/shared)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_job(args.job, args.overrides, data_dir=args.data)
    except ConfigError as e:
        print(f"[FAIL] config   {one_screen(str(e))}", file=sys.stderr)
        return 2
    if args.cluster:  # a file Ray or the KubeRay operator would refuse: said before any other work
        try:
            read_cluster_file(args.cluster)
        except ClusterFileError as e:
            print("\n".join(f"[FAIL] cluster  {line}" for line in str(e).splitlines()), file=sys.stderr)
            return 2
    print(f"raytune_sd3 preflight: {args.job}")
    report = run_checks(cfg, cluster=args.cluster, gpu=args.gpu, strategy=args.strategy,
                        quantization=args.quantization, skip_paths=args.skip_paths)
    print(one_screen("\n".join(report.lines), max_lines=500))  # no secret, no flood, whatever a check says
    if report.problems:
        print(f"\n{len(report.problems)} problem(s) to fix before spending GPU hours:")
        print(one_screen("\n".join(f"  - {p}" for p in report.problems)))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
