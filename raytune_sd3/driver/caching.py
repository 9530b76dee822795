"""From a job config to a manifest: demo data made if needed, images discovered, the cache filled (Ray Data).

Used by `python -m raytune_sd3.train` (and by the cache-only and Tune entry points): one place decides what the
cache must hold for a job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from raytune_sd3 import atomic
from raytune_sd3.config import JobConfig
from raytune_sd3.data.demo import make_demo_dataset
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.encode import CacheReport, CacheSpec, build_cache
from raytune_sd3.data.manifest import Rows, split_eval, write_manifest
from raytune_sd3.data.reader import BucketError, bucket_of, plan_buckets
from raytune_sd3.data.sources import sources_of
from raytune_sd3.data.tables import table_sources
from raytune_sd3.data.webdataset import shard_sources
from raytune_sd3.driver.placement import ensure_resolved
from raytune_sd3.models.loading import component_identity, vae_scaling
from raytune_sd3.run_layout import RunLayout

log = logging.getLogger(__name__)


def cache_spec(cfg: JobConfig, pretrained: str) -> CacheSpec:
    """What the cache's keys and encoders depend on. A job that still holds `auto` dtypes is resolved against
    the connected Ray (or, with none, this process's CPU) first."""
    ensure_resolved(cfg)
    rev = cfg.model.revision
    shift, scale = vae_scaling(pretrained, rev)
    text_ids = tuple(component_identity(pretrained, sub, rev) for sub in
                     ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"))
    return CacheSpec(
        pretrained=pretrained, revision=rev, cache_dir=str(cfg.cache_dir),
        vae_id=component_identity(pretrained, "vae", rev), text_ids=text_ids, vae_shift=shift, vae_scale=scale,
        t5_max_length=cfg.text.t5_max_length, t5_padding=cfg.text.t5_padding, dtype=cfg.model.dtype,
        text_encoder_dtype=cfg.model.text_encoder_dtype,
    )


def prepare_data(cfg: JobConfig, pretrained: str, check_buckets: bool = True) -> tuple[Path, CacheReport]:
    """Fill the cache for this job and write `<output_dir>/manifest.parquet` and `cache_report.json`; then, before
    any worker starts, a bucket too small for a global batch raises BucketError (`check_buckets`; the cache-only
    command logs it instead)."""
    ensure_resolved(cfg)  # model.dtype (the entries' dtype) and the encoders' dtype are in the cache keys
    items, skipped = [], []
    for ds in cfg.data.datasets:
        if ds.type == "demo":
            make_demo_dataset(ds.instance_data_dir, ds.demo_images, size=ds.max_resolution, seed=cfg.train.seed)
        found, unusable = discover(ds, cfg.data.bucket_alignment)
        items += found
        skipped += unusable
    spec = cache_spec(cfg, pretrained)
    negative = [cfg.validation.negative_prompt] if cfg.validation.negative_prompt is not None else []
    sources = {**sources_of([str(ds.instance_data_dir) for ds in cfg.data.datasets if ds.in_store]),
               **table_sources(cfg.data.datasets), **shard_sources(cfg.data.datasets)}
    report = build_cache(spec, items, ["", *cfg.validation.prompts, *negative], cfg.data.encode_batch_size,
                         cfg.data.encode_actors, cfg.data.max_image_pixels, cfg.data.random_flip, sources)
    report.skipped = skipped + report.skipped
    layout = RunLayout.of(cfg)
    summary = {**report.summary(), "buckets": bucket_counts(report.rows)}
    atomic.write_text(layout.cache_report, json.dumps(summary, indent=2))
    used = {r["dataset_id"] for r in report.rows}
    empty = [ds.id for ds in cfg.data.datasets if ds.id not in used]
    if empty:  # after cache_report.json is written: it says why each image was skipped
        raise RuntimeError(f"data set(s) {', '.join(empty)}: no usable image; {layout.cache_report} lists "
                           "each skipped file and why")
    rows = Rows.of(report.rows)  # one table: the bucket check below and the manifest file
    # Before any worker starts: a bucket that cannot fill a global batch is an error naming it (or the policy).
    try:
        train_rows = split_eval(rows, cfg.data.eval_samples)[0]
        if not len(train_rows):  # here, not in the workers, where Ray Train would retry it
            raise BucketError(f"data.eval_samples {cfg.data.eval_samples}: holds out all {len(rows)} cached items "
                              "for the eval loss and leaves none to train on; lower it")
        _, notes = plan_buckets(train_rows, cfg.train.global_batch, cfg.data.small_buckets)
    except BucketError as e:
        if check_buckets:
            raise
        notes = [f"training this job would stop: {e}"]
    for line in notes:
        log.warning("data.small_buckets=%s: %s", cfg.data.small_buckets, line)
    validation = [{"prompt": p, "text_key": report.text_keys[p],
                   **({"negative_key": report.text_keys[negative[0]]} if negative else {})}
                  for p in cfg.validation.prompts]
    manifest = layout.manifest
    write_manifest(manifest, rows, report.text_keys[""], validation, spec.cache_dir)
    if layout.legacy_manifest.exists():  # an earlier version's manifest.json: superseded, so nothing reads it
        layout.legacy_manifest.unlink()
        log.info("%s replaced by %s (columnar; an earlier version wrote JSON)", layout.legacy_manifest, manifest)
    log.debug("cache: %s", json.dumps(summary))
    return manifest, report


def bucket_counts(rows: list[dict]) -> dict[str, int]:
    """Images per bucket ("WxH": n), largest first."""
    counts: dict[str, int] = {}
    for r in rows:
        w, h = bucket_of(r)
        counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
