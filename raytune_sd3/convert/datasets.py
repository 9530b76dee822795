"""One entry of SimpleTuner's multidatabackend.json -> one of our data sets: its storage translated (backends.py),
config.json's data-set defaults applied, then every key through DATASET_RULES. Every data-set setting changes what
is trained, so one without an equivalent is refused (converted without it only with --lossy)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from raytune_sd3.config import is_uri
from raytune_sd3.convert.backends import from_aws, from_huggingface, from_webshart
from raytune_sd3.convert.report import Conversion, Never, NotConverted
from raytune_sd3.convert.rules import (
    Rule,
    Scope,
    apply_rules,
    as_bool,
    as_int,
    as_list,
    choice,
    drop_secrets,
    fmt,
    ignore,
    never_when_on,
    only,
    path,
    to,
)

# config.json keys that are every data set's default in SimpleTuner; convert_dataset applies them
DATASET_GLOBALS = ("resolution", "resolution_type", "caption_strategy", "instance_prompt", "minimum_image_size",
                   "maximum_image_size", "target_downsample_size")
CACHE_WHY = "SimpleTuner's own cache layout; ours is data.cache_dir, keyed by everything that changes an entry"
LOADER_WHY = "a SimpleTuner data-loader or cache-writer setting; Ray Data schedules our caching"


def _in_pixels(v: Any, s: Scope) -> int:
    """A size in SimpleTuner's resolution unit -> ours: megapixels (resolution_type area) become the side of a
    square of that area, as our pixel_area."""
    if str(s.settings.get("resolution_type", "pixel_area")) == "area":
        return round(math.sqrt(float(v) * 1e6))
    return as_int(v)


def _resolution(v: Any, s: Scope) -> dict[str, Any]:
    ours = _in_pixels(v, s)
    if str(s.settings.get("resolution_type")) == "area":
        s.note(f"resolution {v} megapixels (resolution_type area) becomes {ours} with resolution_type pixel_area")
    return {"resolution": ours}


def _size_key(key: str) -> Rule:
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        return {} if float(v) == 0 else {key: _in_pixels(v, s)}
    return rule


def _caption_strategy(v: Any, s: Scope) -> dict[str, Any]:
    if v not in ("filename", "textfile", "instanceprompt"):
        raise NotConverted("captions come from a .txt beside each image, else the file name (textfile)")
    return {"caption_strategy": v}


def _crop_aspect(v: Any, s: Scope) -> dict[str, Any]:
    if v in ("closest", "random") and not s.settings.get("crop_aspect_buckets"):
        raise Never(f"crop_aspect {v} needs crop_aspect_buckets (SimpleTuner refuses it too): add e.g. "
                    "\"crop_aspect_buckets\": [0.75, 1.0, 1.33]")
    if v not in ("square", "preserve", "closest", "random"):
        raise NotConverted("crop_aspect is square, preserve, closest or random")
    return {"crop_aspect": v}


def _aspect_buckets(v: Any, s: Scope) -> dict[str, Any]:
    """Ratios, or SimpleTuner's weighted {"aspect_bucket": 1.0, "weight": 0.5} (weights are not used here)."""
    ratios = []
    for b in as_list(v):
        if isinstance(b, dict):
            raise NotConverted("weighted aspect buckets: we pick among plain ratios, e.g. [0.75, 1.0, 1.33]")
        ratios.append(float(b))
    return {"crop_aspect_buckets": ratios}


DATASET_DEFAULTS = {"resolution": 1024, "resolution_type": "pixel_area", "caption_strategy": "filename",
                    "crop": False, "crop_aspect": "square", "crop_style": "random"}  # SimpleTuner's, per data set
DATASET_RULES: dict[str, Rule] = {
    "id": to("id", str),
    "type": to("type", str),  # only local data sets get here
    "conditioning": never_when_on("conditioning data are for ControlNet and edit models, which raytune_sd3 does "
                                  "not train"),
    "dataset_type": lambda v, s: {},
    "disabled": lambda v, s: {},
    "instance_data_dir": lambda v, s: ({"instance_data_dir": str(v)} if is_uri(str(v))
                                       else path("instance_data_dir")(v, s)),
    "dataset": to("dataset", str),
    "split": to("split", str),
    "image_column": to("image_column", str),
    "caption_column": to("caption_column", str),
    "urls": to("urls", str),
    "caption_strategy": _caption_strategy,
    "instance_prompt": to("instance_prompt", str),
    "resolution": _resolution,
    "resolution_type": choice("resolution_type", {"pixel_area": "pixel_area", "pixel": "pixel", "area": "pixel_area"},
                              "resolution_type is pixel_area, pixel or area"),
    "crop": to("crop", as_bool),
    "crop_style": choice("crop_style", {"center": "center", "centre": "center", "corner": "corner",
                                        "random": "random"}, "no face detection here: center, corner or random"),
    "crop_aspect": _crop_aspect,
    "crop_aspect_buckets": _aspect_buckets,
    "minimum_image_size": _size_key("minimum_image_size"),
    "maximum_image_size": _size_key("maximum_image_size"),
    "target_downsample_size": _size_key("target_downsample_size"),
    "repeats": lambda v, s: {"repeats": as_int(v)} if as_int(v) else {},
    "is_regularisation_data": lambda v, s: {"is_regularisation_data": True} if as_bool(v) else {},
    "probability": only(lambda v: float(v) == 1, "every data set's batches are shuffled together here: weight a "
                                                 "data set by its number of images and repeats instead"),
    **{k: ignore(CACHE_WHY) for k in ("cache_dir_vae", "cache_dir", "text_embeds", "image_embeds", "hash_filenames",
                                      "preserve_data_backend_cache", "vae_cache_clear_each_epoch")},
    **{k: ignore(LOADER_WHY) for k in ("metadata_backend", "skip_file_discovery", "write_batch_size", "default",
                                       "scan_for_errors", "read_batch_size", "max_workers", "vae_cache_ondemand",
                                       "vae_cache_scan_behaviour", "image_processing_batch_size",
                                       "metadata_update_interval", "compress_cache", "disable_validation")},
}


def convert_dataset(entry: dict[str, Any], config: dict[str, Any], conv: Conversion, source: Path) -> dict | None:
    """One data-loader entry -> our data set (a dict), or None for an entry that is not an image folder."""
    where = f"{source.name}[{entry['id']}]"
    entry = drop_secrets(entry, f"{where}.", conv)
    kind, backend = str(entry.get("dataset_type", "image")), str(entry.get("type", "local"))
    if str(entry.get("disabled", entry.get("disable", False))).lower() in ("true", "1", "yes"):
        conv.ignored.append(f"{where} (disabled: SimpleTuner skips it too)")
        return None
    if kind in ("text_embeds", "image_embeds", "conditioning_image_embeds", "eval"):
        for key, value in entry.items():
            if key not in ("id", "type", "dataset_type", "disabled"):
                conv.ignored.append(f"{where}.{key} = {fmt(value)} (a setting of SimpleTuner's {kind} data set; "
                                    "ours: data.cache_dir (keyed by everything that changes an entry) and "
                                    "data.eval_samples)")
        return None
    if kind != "image":
        conv.never.append(f"{source}: [{entry['id']}] dataset_type {kind}: raytune_sd3 trains on images only "
                          "(dataset_type image)")
        return None
    try:
        if backend == "aws":
            entry = from_aws(dict(entry), f"{where}.", conv)
        elif backend == "huggingface":
            entry = from_huggingface(dict(entry), f"{where}.", conv)
        elif backend == "webshart":
            entry = from_webshart(dict(entry), f"{where}.", conv)
    except Never as e:
        conv.never.append(f"{source}: {e}")
        return None
    if backend not in ("local", "aws", "huggingface", "webshart"):
        conv.never.append(f"{source}: [{entry['id']}] type {backend}: raytune_sd3 reads folders (local, mounted or "
                          "in S3/GCS), Parquet files, Hugging Face data sets and WebDataset shards; copy its images "
                          "(and .txt captions) to one of those")
        return None
    if backend not in ("huggingface", "webshart") and not entry.get("instance_data_dir"):
        conv.never.append(f"{source}: [{entry['id']}] has no instance_data_dir: set the folder of its images")
        return None
    explicit = {**{k: config[k] for k in DATASET_GLOBALS if config.get(k) not in (None, "")}, **entry}
    settings = {**DATASET_DEFAULTS, **explicit}
    if settings["crop"] is False:  # SimpleTuner's crop style and aspect only matter when it crops
        settings = {k: v for k, v in settings.items() if k in explicit or k not in ("crop_style", "crop_aspect")}
    scope = Scope(settings, conv, where=f"{where}.", defaults=set(DATASET_DEFAULTS) - set(explicit), source=source,
                  data=True)
    apply_rules(DATASET_RULES, scope)
    return scope.out
