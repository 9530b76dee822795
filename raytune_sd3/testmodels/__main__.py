"""python -m raytune_sd3.testmodels OUT_DIR [--sd35] [--seed N]
python -m raytune_sd3.testmodels OUT_DIR --shape sd35-large|sd35-medium [--device cuda|cpu|meta]

Builds a tiny random SD3 pipeline (tiny.py) for tests and smoke runs, or one with a real-size SD3.5 transformer
(shaped.py) for GPU benchmarks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raytune_sd3.testmodels.shaped import SHAPES, build_shaped_pipeline
from raytune_sd3.testmodels.tiny import build_tiny_pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raytune_sd3.testmodels",
                                     description="Build a tiny random SD3 pipeline for tests and smoke runs, or one "
                                                 "with a real-size SD3.5 transformer (--shape) for GPU benchmarks.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sd35", action="store_true", help="SD3.5 variant: qk RMSNorm and dual attention")
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="the real SD3.5 transformer with random bf16 weights, narrow text encoders of the real "
                             "widths (testmodels/shaped.py); Large writes 16 GB")
    parser.add_argument("--device", choices=("cuda", "cpu", "meta"),
                        help="with --shape: where the weights are made (default cuda when there is one, else cpu); "
                             "meta: a dry run that writes every file but the transformer's weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.shape is None:
        if args.device:
            parser.error("--device goes with --shape (the tiny pipeline is always built on the CPU)")
        print(build_tiny_pipeline(args.out_dir, sd35=args.sd35, seed=args.seed))
        return
    if args.sd35:
        parser.error("--sd35 is the tiny pipeline's variant; --shape sd35-* already is SD3.5")
    try:
        print(build_shaped_pipeline(args.out_dir, args.shape, device=args.device, seed=args.seed))
    except (ValueError, FileExistsError) as e:  # no GPU, or a folder in the way: say so without a traceback
        parser.error(str(e))


if __name__ == "__main__":
    main()
