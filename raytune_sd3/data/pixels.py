"""Image files to training pixels: header checks, decoding (EXIF, alpha, 16-bit, CMYK), downsampling, resizing and
cropping to the bucket, masks alike; and the caching stage's decode task. Free of torch on purpose: Ray starts a
worker process for the decode tasks, and one that imports only numpy and PIL is ready in a second where importing
torch took several (on a 2-core machine, while the encoder actors start beside it)."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from raytune_sd3.data.buckets import Plan, Sizing, plan, seed_from_key, too_small
from raytune_sd3.data.reading import Sources, open_file


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale (16-bit PNGs, TIFFs) scaled to 8 bits; PIL's convert would clip them to white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64) / 257.0  # 65535 -> 255
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a
    else:
        return im
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def image_size(path: str | BinaryIO) -> tuple[int, int]:
    """(width, height) as displayed, from the header alone: EXIF orientations 5-8 swap the sides. `path`: a file's
    path or the file's bytes as a file object."""
    Image.MAX_IMAGE_PIXELS = None  # the size limit is ours (data.max_image_pixels), checked before decoding
    with Image.open(path) as im:
        w, h = im.size
        try:
            rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)
        except Exception:  # noqa: BLE001 - unreadable EXIF: PIL's exif_transpose ignores it too
            rotated = False
    return (h, w) if rotated else (w, h)


def image_problem(path: str, sizing: Sizing, max_pixels: int) -> str:
    """Why the image at `path` cannot be used, from its header alone (no decoding), or "" when it can."""
    try:
        w, h = image_size(path)
    except Exception as e:  # noqa: BLE001 - not an image PIL can read: skip and report
        return f"not a readable image: {type(e).__name__}: {e}"
    return size_problem(w, h, sizing, max_pixels)


def size_problem(w: int, h: int, sizing: Sizing, max_pixels: int) -> str:
    """Why an image of `w` x `h` (as displayed) cannot be used under `sizing`, or ""."""
    if w * h > max_pixels:
        return (f"too large: {w}x{h} = {w * h} pixels > data.max_image_pixels {max_pixels} (a guard against "
                "decompression bombs; raise it to use this image)")
    return too_small(w, h, sizing)


def _apply(im: Image.Image, p: Plan, resample: Image.Resampling) -> Image.Image:
    if p.downsample:
        im = im.resize(p.downsample, Image.Resampling.LANCZOS)
    if im.size != p.resize:
        im = im.resize(p.resize, resample)
    return im.crop(p.box)


def load_image(path: str | BinaryIO, p: Plan) -> np.ndarray:
    """RGB uint8 (height, width, 3) of the plan's size: EXIF orientation applied, alpha on white, 16-bit scaled,
    CMYK and palettes converted, then downsampled, resized and cropped as `p` says."""
    Image.MAX_IMAGE_PIXELS = None  # checked against data.max_image_pixels by image_problem before this
    with Image.open(path) as im:
        im = _to_8bit(ImageOps.exif_transpose(im))
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return np.asarray(_apply(im.convert("RGB"), p, Image.Resampling.BICUBIC), dtype=np.uint8)


def load_mask(path: str | BinaryIO, p: Plan) -> np.ndarray:
    """A mask image as float32 (height, width) in [0, 1] (white = 1), cut exactly like its image."""
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        im = _to_8bit(ImageOps.exif_transpose(im))
        if im.mode in ("RGBA", "LA", "PA"):  # a transparent mask is black where transparent
            im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
        return np.asarray(_apply(im.convert("L"), p, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def decode(path: str, sizing: Sizing, seed: int = 0) -> np.ndarray:
    """The training pixels of the image at `path` under `sizing` (its plan from the header, then load_image)."""
    return load_image(path, plan(*image_size(path), sizing, seed))


def plan_of(row: dict) -> Plan:
    w, h = int(row["orig_width"]), int(row["orig_height"])
    return plan(w, h, Sizing.from_json(str(row["sizing"])), seed_from_key(str(row["latent_key"])))


def decode_batch(batch: dict, sources: Sources | None = None) -> dict:
    """CPU task: decode, resize and crop (and the mask alike); a bad file becomes an error row instead of stopping
    the job. A batch may hold several buckets (a ragged column); the VAE actor encodes each size apart. `sources`:
    the store folders images are read from (data/sources.py), when some are not local files."""
    pixels, masks, errors = [], [], []
    for i, path in enumerate(batch["path"]):
        w, h = int(batch["width"][i]), int(batch["height"][i])
        row = {**{k: batch[k][i] for k in ("orig_width", "orig_height", "sizing")},
               "latent_key": batch["crop_key"][i] if "crop_key" in batch else batch["latent_key"][i]}
        try:
            p = plan_of(row)  # a mirrored entry's crop is its plain entry's (crop_key), then mirrored
            image = load_image(open_file(str(path), sources), p)
            mask_path = str(batch["mask_path"][i])
            mask = load_mask(open_file(mask_path, sources), p) if mask_path else np.ones((h, w), np.float32)
            if "flipped" in batch and batch["flipped"][i]:
                image, mask = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
            pixels.append(image)
            masks.append(mask)
            errors.append("")
        except Exception as e:  # noqa: BLE001 - any decoder failure means: skip and report this file
            pixels.append(np.zeros((h, w, 3), np.uint8))
            masks.append(np.ones((h, w), np.float32))
            errors.append(f"cannot decode: {type(e).__name__}: {e}")
    return {**batch, "pixels": _column(pixels), "mask": _column(masks), "error": np.array(errors)}


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """One array when every shape is the same, else an object array (Ray Data's ragged tensor column)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
