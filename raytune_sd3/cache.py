"""python -m raytune_sd3.cache JOB.yaml [--data DIR] [--set key=value ...] [--verify]

The caching stage alone: discover the job's images, encode what the cache lacks (Ray Data), write
`<output_dir>/manifest.parquet` and `cache_report.json`, and print the summary. Training runs it too; run it alone to
fill a cache before booting GPUs for training, or to see which images were skipped and why.

--verify encodes nothing: it reads every entry of the job's cache, recomputes its checksum, and removes the bad
ones (truncated, unreadable, checksum mismatch) so that the next run encodes them again. Exit status 1 when it
found any.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from raytune_sd3.config import ConfigError


def verify_cache(root: Path | str, workers: int = 8) -> dict:
    """Check every entry under `root` (threads: reading and hashing release the GIL); remove the bad ones."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    # imported here for start-up time: data.store loads torch
    from raytune_sd3.data.store import CacheStore

    store = CacheStore(root)
    entries = store.entries()
    with ThreadPoolExecutor(workers) as pool:
        problems = list(tqdm(pool.map(lambda e: store.verify(*e), entries), total=len(entries),
                             desc="verifying cache", unit="entry", disable=not sys.stderr.isatty()))
    bad = [{"kind": kind, "key": key, "problem": p} for (kind, key), p in zip(entries, problems, strict=True) if p]
    for b in bad:
        store.remove(b["kind"], b["key"])
    return {"cache_dir": store.name, "entries": len(entries), "good": len(entries) - len(bad), "removed": bad,
            "stale_temporaries_removed": store.remove_stale_temporaries()}


def main(argv: list[str] | None = None) -> int:
    from raytune_sd3.driver import cli

    parser = cli.job_parser("python -m raytune_sd3.cache", __doc__)
    parser.add_argument("--verify", action="store_true",
                        help="check every cache entry's checksum and remove bad ones; encode nothing")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = cli.read_job(args, paths=not args.verify)
        return verify(cfg) if args.verify else fill(cfg, args.verbose)

    return cli.run(body, args.verbose)


def verify(cfg) -> int:
    """--verify: every entry's checksum; bad ones removed for the next run to encode again. 1 when any was bad."""
    from raytune_sd3.data.files import is_uri

    if not is_uri(cfg.cache_dir) and not Path(cfg.cache_dir).is_dir():
        raise ConfigError(f"{cfg.cache_dir} is not a cache folder (data.cache_dir, default <output_dir>/cache)")
    result = verify_cache(cfg.cache_dir)
    print(json.dumps({k: v for k, v in result.items() if k != "removed"} | {"removed": len(result["removed"])},
                     indent=2))
    for b in result["removed"]:
        print(f"removed {b['kind']}/{b['key']}: {b['problem']} (the next run encodes it again)", file=sys.stderr)
    return 1 if result["removed"] else 0


def fill(cfg, verbose: bool = False) -> int:
    """Encode what the cache lacks for this job; print the summary and each skipped image."""
    # imported here for start-up time: driver.caching, testmodels.resolve load torch
    from raytune_sd3.driver.caching import prepare_data
    from raytune_sd3.driver.cli import connect
    from raytune_sd3.testmodels.resolve import resolve_pretrained

    # The same `auto` choices as training on this cluster (model.dtype is in the cache keys); placement is not
    # checked: the cache may be filled on another cluster than the one that trains.
    pretrained = resolve_pretrained(cfg.model.pretrained)  # before Ray, as in driver/training.py
    connect(cfg, place=False, verbose=verbose)
    _, report = prepare_data(cfg, pretrained, check_buckets=False)
    summary = report.summary()
    summary["images_per_s"] = round(report.latents_encoded / report.seconds, 2) if report.seconds else 0.0
    print(json.dumps(summary, indent=2))
    for s in report.skipped:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
