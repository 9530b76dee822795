"""python -m raytune_sd3.cache JOB.yaml [--data DIR] [--set key=value ...]

The caching stage alone: discover the job's images, encode what the cache lacks (Ray Data), write
`<output_dir>/manifest.json` and `cache_report.json`, and print the summary. Training runs it too; run it alone to
fill a cache before booting GPUs for training, or to see which images were skipped and why.
"""

from __future__ import annotations

import json
import logging
import sys

from raytune_sd3.config import ConfigError, check_paths, load_job


def main(argv: list[str] | None = None) -> int:
    from raytune_sd3.train.__main__ import job_parser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = job_parser("python -m raytune_sd3.cache", __doc__).parse_args(argv)
    try:
        cfg = load_job(args.job, args.overrides, data_dir=args.data)
        check_paths(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from raytune_sd3.data.prepare import prepare_data
    from raytune_sd3.models.loading import resolve_pretrained
    from raytune_sd3.runtime import init_ray

    pretrained = resolve_pretrained(cfg.model.pretrained)
    init_ray(cfg)
    _, report = prepare_data(cfg, pretrained)
    summary = report.summary()
    summary["images_per_s"] = round(report.latents_encoded / report.seconds, 2) if report.seconds else 0.0
    print(json.dumps(summary, indent=2))
    for s in report.skipped:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
