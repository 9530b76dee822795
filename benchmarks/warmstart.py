"""Warm start: seconds to confirm a filled cache for N images, and what a worker spends reading the manifest.

    python benchmarks/warmstart.py                         # 1k, 4k, 16k, 64k tiny PNGs (64 px); ~10 min here
    python benchmarks/warmstart.py --sizes 1000,4000 --repeats 3

For each N: N tiny PNGs (64 px, each its own pixels and its own file-name caption) are generated with mtimes an
hour old (a data set prepared before the run), and the cache is filled once through the caching stage's own keying
(`_keyed`: header check, hash, key) and `CacheStore.write` of one latent and one text entry per image under the real
keys (placeholder tensors: the encoders' output does not change what a warm start checks), with the stat index
recorded as a real fill records it. Then, timed:
  new      what `prepare_data` and a worker do on a warm cache today: discover, `build_cache` (stat index: stats,
           no image opened, entries known whole by their length), manifest.parquet written, then read back as a
           worker does (READER_COLUMNS, eval split, bucket plan)
  old      the earlier path in the same process, for N <= --old-max: discover, every image's header read and bytes
           hashed and every entry's header read (`_keyed` without the index, in threads), text entries' headers,
           manifest.json written and parsed whole (what each worker did). Past 4,096 images the earlier code ran
           this in Ray Data tasks (6.8 ms an image on this machine in issue 14's measurement); the threads path
           here is the faster of the two, so the ratio is a lower bound.
Figures: seconds (median of --repeats), ms per image, old/new, and the new path extrapolated to 1M images from the
per-image cost of the largest N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import RESULTS, command, machine, machine_line, median, table, write_section


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,4000,16000,64000", help="image counts, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side (default 2)")
    p.add_argument("--old-max", type=int, default=4096, help="largest N the old path is timed at (default 4096)")
    p.add_argument("--workdir", type=Path, default=None, help="where the images and caches go (default a temp dir)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def make_images(folder: Path, n: int) -> None:
    """`n` 64 px PNGs, each with its own pixels (its number in the first row), mtimes an hour old."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    past = time.time() - 3600
    base = np.full((64, 64, 3), 128, dtype=np.uint8)
    for i in range(n):
        px = base.copy()
        px[0, :4] = np.frombuffer(i.to_bytes(12, "little"), dtype=np.uint8).reshape(4, 3)
        path = folder / f"img_{i:07d}.png"
        Image.fromarray(px).save(path, compress_level=1)
        os.utime(path, (past, past))


def fill(spec, items) -> None:
    """The cache's entries under the real keys, and the stat index as a real fill leaves it."""
    import torch

    from raytune_sd3.data import encode
    from raytune_sd3.data.index import StatIndex
    from raytune_sd3.data.store import CacheStore

    store = CacheStore(spec.cache_dir)
    index = StatIndex.load(store.files)
    rows = [{**it.to_row(), "uid": i} for i, it in enumerate(items)]
    hashing, encode.LOCAL_HASHING = encode.LOCAL_HASHING, 10**9  # threads here: this benchmark starts no Ray
    try:
        keyed = encode._keyed(rows, spec, 250_000_000, {}, index)
    finally:
        encode.LOCAL_HASHING = hashing
    latents, text = torch.zeros(16, 8, 8), {"prompt_embeds": torch.zeros(154, 64), "pooled": torch.zeros(64)}
    for r in keyed:
        index.add_entry("latents", str(r["latent_key"]), store.write("latents", str(r["latent_key"]), {"latents": latents}))
    for caption in {c for it in items for c in it.captions} | {""}:
        key = spec.text_key(caption)
        index.add_entry("text", key, store.write("text", key, text))
    index.save()


def new_side(ds, spec, out: Path) -> tuple[float, dict]:
    from raytune_sd3.data.discovery import discover
    from raytune_sd3.data.encode import build_cache
    from raytune_sd3.data.manifest import READER_COLUMNS, Rows, read_manifest, split_eval, write_manifest
    from raytune_sd3.data.reader import plan_buckets
    from raytune_sd3.run_layout import MANIFEST

    t0 = time.perf_counter()
    items, _ = discover(ds, 16)
    t1 = time.perf_counter()
    report = build_cache(spec, items, [""], max_pixels=250_000_000)
    t2 = time.perf_counter()
    assert report.latents_encoded == 0 and report.texts_encoded == 0 and report.files_hashed == 0, report.summary()
    write_manifest(out / MANIFEST, Rows.of(report.rows), report.text_keys[""], [], spec.cache_dir)
    t3 = time.perf_counter()
    manifest = read_manifest(out / MANIFEST, READER_COLUMNS)
    train, _ = split_eval(manifest["rows"], 4)
    plan_buckets(train, 4)
    t4 = time.perf_counter()
    return t4 - t0, {"discover": t1 - t0, "confirm": t2 - t1, "manifest write": t3 - t2, "worker read": t4 - t3}


def old_side(ds, spec, out: Path) -> tuple[float, dict]:
    from concurrent.futures import ThreadPoolExecutor

    from raytune_sd3.data.discovery import discover
    from raytune_sd3.data.encode import _keyed
    from raytune_sd3.data.store import CacheStore

    t0 = time.perf_counter()
    items, _ = discover(ds, 16)
    t1 = time.perf_counter()
    keyed = _keyed([{**it.to_row(), "uid": i} for i, it in enumerate(items)], spec, 250_000_000, {})
    assert all(r["hit"] for r in keyed)
    store = CacheStore(spec.cache_dir)
    captions = sorted({c for it in items for c in it.captions} | {""})
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda c: store.has("text", spec.text_key(c)), captions))
    t2 = time.perf_counter()
    rows = [{**it.to_row(), "latent_key": str(r["latent_key"]), "width": int(r["width"]), "height": int(r["height"]),
             "regularisation": False, "repeats": 0, "text_key": spec.text_key(it.caption),
             "text_keys": [spec.text_key(c) for c in it.captions]} for it, r in zip(items, keyed, strict=True)]
    (out / "manifest.json").write_text(json.dumps({"cache_dir": spec.cache_dir, "uncond_key": "", "rows": rows}))
    t3 = time.perf_counter()
    json.loads((out / "manifest.json").read_text())
    t4 = time.perf_counter()
    return t4 - t0, {"discover": t1 - t0, "confirm": t2 - t1, "manifest write": t3 - t2, "worker read": t4 - t3}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import dataclasses

    from raytune_sd3.config import DatasetConfig, load_job
    from raytune_sd3.data.discovery import discover
    from raytune_sd3.driver.caching import cache_spec
    from raytune_sd3.testmodels.resolve import resolve_pretrained

    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="raytune_sd3-bench-warmstart-"))
    cfg = load_job(Path(__file__).resolve().parents[1] / "jobs" / "tiny.yaml", [f"output_dir={work / 'out'}"])
    base_spec = cache_spec(cfg, str(resolve_pretrained(cfg.model.pretrained)))  # no Ray: CPU dtypes
    results = []
    try:
        for n in sizes:
            images, out = work / f"images-{n}", work / f"out-{n}"
            out.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            make_images(images, n)
            ds = DatasetConfig(id="bench", instance_data_dir=images, resolution=64, caption_strategy="filename")
            spec = dataclasses.replace(base_spec, cache_dir=str(work / f"cache-{n}"))
            fill(spec, discover(ds, 16)[0])
            print(f"{n} images generated and cached in {time.perf_counter() - t:.1f} s", flush=True)
            new = [new_side(ds, spec, out) for _ in range(args.repeats)]
            old = [old_side(ds, spec, out) for _ in range(args.repeats)] if n <= args.old_max else []
            row = {"images": n, "new_s": median([s for s, _ in new]),
                   "new_parts": {k: median([p[k] for _, p in new]) for k in new[0][1]},
                   "old_s": median([s for s, _ in old]) if old else None,
                   "old_parts": {k: median([p[k] for _, p in old]) for k in old[0][1]} if old else None}
            results.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(images)
            shutil.rmtree(work / f"cache-{n}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    info = machine()
    largest = results[-1]
    per_image = largest["new_s"] / largest["images"]
    rows = []
    for r in results:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["new_parts"].items())
        old = (f"{r['old_s']:.2f} ({1e3 * r['old_s'] / r['images']:.2f} ms/img)" if r["old_s"] is not None else "-")
        ratio = f"{r['old_s'] / r['new_s']:.1f}x" if r["old_s"] is not None else "-"
        rows.append([f"{r['images']:,}", f"{r['new_s']:.2f}", f"{1e3 * r['new_s'] / r['images']:.3f}", parts, old,
                     ratio])
    body = "\n\n".join([
        f"Measured {machine_line(info)}. Command: {command('warmstart.py', argv)}. Medians of {args.repeats} runs; "
        "seconds from discovery to a worker's bucket plan, on a cache filled once (see the script's docstring). "
        "The old path is timed up to 4,096 images only, in driver threads (past that it ran in Ray Data tasks, "
        "6.8 ms an image here by issue 14's measurement).",
        table(["images", "new (s)", "new ms/img", "new, by part (s)", "old (s)", "old/new"], rows),
        f"Extrapolated linearly from {largest['images']:,} images: a warm start of 1,000,000 images takes about "
        f"**{per_image * 1e6:.0f} s** here on the new path ({1e3 * per_image:.3f} ms an image).",
    ])
    print(body)
    if not args.no_write:
        gpu = "no GPU" if info["gpu"] == "none" else info["gpu"]
        write_section(f"warm start: confirming a filled cache ({info['cores']} CPU cores, {gpu})", body, args.results)
    return {"results": results, "per_image_s": per_image, "machine": info}


if __name__ == "__main__":
    main()
