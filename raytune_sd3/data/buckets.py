"""Aspect buckets: the training size of each image, and how it is resized and cropped to get there (SimpleTuner's
rules for SD3).

    resolution_type pixel_area: resolution R means about R*R pixels of area; pixel: the shorter side is R.
    Each side is rounded to a multiple of `alignment` (64 for SD3), so images of similar shape share one size: a
    bucket. Without crop, the bucket keeps the image's aspect ratio; with crop, crop_aspect chooses it (square,
    preserve, closest / random of crop_aspect_buckets) and crop_style where the window sits (center, corner =
    top-left, random = seeded by the image's bytes, so the same on every run).

An image larger than maximum_image_size is first downsampled to target_downsample_size (same unit as
resolution). Without crop the image is then resized to just cover its bucket (a few pixels trimmed by the
rounding); with crop the window is cut from the (downsampled) image at its own scale, enlarged only when the
image is smaller than the window. So crop: true with no downsample on a 4000 px photo trains on a 1024 px
detail, as in SimpleTuner.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Sizing:
    """One data set's sizing settings at one resolution; its JSON is part of the latent cache key."""

    resolution: int
    resolution_type: str = "pixel_area"
    crop: bool = False
    crop_style: str = "center"
    crop_aspect: str = "square"
    crop_aspect_buckets: tuple[float, ...] = ()
    minimum_image_size: int = 0
    maximum_image_size: int | None = None
    target_downsample_size: int | None = None
    alignment: int = 64

    @classmethod
    def square(cls, side: int) -> Sizing:
        """A `side` x `side` square: shorter side resized to it (larger images downsampled), centre crop."""
        return cls(side, "pixel", True, "center", "square", (), 0, side, side, 16)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Sizing:
        d = json.loads(text)
        d["crop_aspect_buckets"] = tuple(d["crop_aspect_buckets"])
        return cls(**d)


@dataclass(frozen=True)
class Plan:
    """How one image becomes its training pixels: downsample (optional), resize, then crop `box` of `size`."""

    downsample: tuple[int, int] | None
    resize: tuple[int, int]
    box: tuple[int, int, int, int]
    size: tuple[int, int]


def measure(width: int, height: int, resolution_type: str) -> float:
    """An image's size in the unit of `resolution`: the shorter side (pixel) or the side of the square of equal
    area (pixel_area)."""
    return min(width, height) if resolution_type == "pixel" else math.sqrt(width * height)


def _align(x: float, alignment: int) -> int:
    return max(alignment, int(round(x / alignment)) * alignment)


def size_for_aspect(aspect: float, s: Sizing) -> tuple[int, int]:
    """(width, height) of the bucket for aspect ratio width/height."""
    r = s.resolution
    if s.resolution_type == "pixel":
        if aspect >= 1:
            return _align(r * aspect, s.alignment), _align(r, s.alignment)
        return _align(r, s.alignment), _align(r / aspect, s.alignment)
    return _align(r * math.sqrt(aspect), s.alignment), _align(r / math.sqrt(aspect), s.alignment)


def too_small(width: int, height: int, s: Sizing) -> str:
    """Why the image is below minimum_image_size, or ""."""
    if s.minimum_image_size and measure(width, height, s.resolution_type) < s.minimum_image_size:
        unit = "shorter side" if s.resolution_type == "pixel" else "square root of its area"
        return (f"too small: {width}x{height}, {unit} below minimum_image_size {s.minimum_image_size} "
                f"(resolution_type {s.resolution_type})")
    return ""


def _choose_aspect(aspect: float, s: Sizing, rng: np.random.Generator) -> float:
    if not s.crop or s.crop_aspect == "preserve":
        return aspect
    if s.crop_aspect == "square":
        return 1.0
    if s.crop_aspect == "random":
        return float(s.crop_aspect_buckets[int(rng.integers(len(s.crop_aspect_buckets)))])
    return min(s.crop_aspect_buckets, key=lambda b: abs(math.log(b / aspect)))  # closest


def plan(width: int, height: int, s: Sizing, seed: int) -> Plan:
    """The resize and crop of a `width` x `height` image (EXIF orientation applied) under `s`; `seed` (from the
    image's bytes) makes random aspects and crops the same on every run."""
    # Drawn from only for a random aspect or crop (in that order); a warm start plans every image, and making a
    # generator costs more than the rest of the plan.
    rng = np.random.default_rng(seed) if s.crop and "random" in (s.crop_aspect, s.crop_style) else None
    downsample = None
    if s.maximum_image_size and s.target_downsample_size:
        m = measure(width, height, s.resolution_type)
        if m > s.maximum_image_size:
            k = s.target_downsample_size / m
            downsample = (max(1, round(width * k)), max(1, round(height * k)))
    w, h = downsample or (width, height)
    tw, th = size_for_aspect(_choose_aspect(w / h, s, rng), s)
    k = max(tw / w, th / h)
    if s.crop:
        k = max(k, 1.0)  # crop at the image's own scale; enlarge only when it is smaller than the window
    rw, rh = max(tw, round(w * k)), max(th, round(h * k))
    if s.crop_style == "corner":
        left, top = 0, 0
    elif s.crop_style == "random":
        left, top = int(rng.integers(rw - tw + 1)), int(rng.integers(rh - th + 1))
    else:
        left, top = (rw - tw) // 2, (rh - th) // 2
    return Plan(downsample, (rw, rh), (left, top, left + tw, top + th), (tw, th))

def seed_from_key(key: str) -> int:
    """A per-entry seed (its random crop, the VAE's posterior sample), independent of batching and of which worker
    encodes it."""
    return int(key[:15], 16)


def sizings_of(ds, alignment: int) -> list[Sizing]:
    """One Sizing per resolution of a data set (config.DatasetConfig): what the cache key and the resize/crop of
    each of its images depend on."""
    style = "center" if ds.crop_style == "centre" else ds.crop_style
    return [Sizing(r, ds.resolution_type, ds.crop, style, ds.crop_aspect if ds.crop else "square",
                   tuple(ds.crop_aspect_buckets or ()) if ds.crop else (), ds.minimum_image_size or 0,
                   ds.maximum_image_size, ds.target_downsample_size, alignment)
            for r in ds.resolutions]
