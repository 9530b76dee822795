"""The caching stage: Ray Data reads and crops images in CPU tasks and encodes them (VAE) and the captions (CLIP-L,
CLIP-G, T5) in actor pools, writing entries into the CacheStore. Entries already there are not encoded again.

    items -> [task] hash bytes, cache key, hit?  -> misses -> [task] decode, resize, crop -> [VAE actors] -> store
    unique captions -> keys -> misses -> [text actors] -> store
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from raytune_sd3.data.discovery import Item
from raytune_sd3.data.store import CacheStore, latent_key, seed_from_key, text_key
from raytune_sd3.models.loading import DTYPES

CROP = "center"


@dataclass(frozen=True)
class CacheSpec:
    """Everything the encoders need to know, picklable for Ray."""

    pretrained: str
    revision: str | None
    cache_dir: str
    vae_id: str
    text_ids: tuple[str, ...]
    vae_shift: float
    vae_scale: float
    t5_max_length: int
    t5_padding: str
    dtype: str
    text_encoder_dtype: str = "fp32"

    def latent_key(self, image_sha256: str, resolution: int) -> str:
        return latent_key(image_sha256, resolution, CROP, self.vae_id, self.vae_shift, self.vae_scale, self.dtype)

    def text_key(self, caption: str) -> str:
        return text_key(caption, list(self.text_ids), self.t5_max_length, self.t5_padding, self.dtype,
                        self.text_encoder_dtype)


@dataclass
class CacheReport:
    """What the caching stage did; `rows` is the manifest (one dict per usable image)."""

    rows: list[dict] = field(default_factory=list)
    text_keys: dict[str, str] = field(default_factory=dict)
    latents_encoded: int = 0
    latents_reused: int = 0
    texts_encoded: int = 0
    texts_reused: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("rows")
        d.pop("text_keys")
        d["items"] = len(self.rows)
        return d


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


def image_problem(path: str, min_side: int, max_pixels: int) -> str:
    """Why the image at `path` cannot be used, from its header alone (no decoding), or "" when it can."""
    Image.MAX_IMAGE_PIXELS = None  # the size limit is ours (data.max_image_pixels), checked before decoding
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - not an image PIL can read: skip and report
        return f"not a readable image: {type(e).__name__}: {e}"
    if w * h > max_pixels:
        return (f"too large: {w}x{h} = {w * h} pixels > data.max_image_pixels {max_pixels} (a guard against "
                "decompression bombs; raise it to use this image)")
    if min(w, h) < min_side:
        return f"too small: {w}x{h}, shorter side below minimum_image_size {min_side}"
    return ""


def load_image(path: str, resolution: int) -> np.ndarray:
    """RGB uint8 (resolution, resolution, 3): EXIF orientation applied, alpha on white, 16-bit scaled, CMYK and
    palettes converted, shorter side resized, centre crop."""
    Image.MAX_IMAGE_PIXELS = None  # checked against data.max_image_pixels by image_problem before this
    with Image.open(path) as im:
        im = _to_8bit(ImageOps.exif_transpose(im))
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.BICUBIC)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        return np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1] (the VAE's input range)."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, keys: list[str], shift: float, scale: float) -> torch.Tensor:
    """Posterior samples with SD3's shift and scale: (sample - shift) * scale, each seeded by its cache key."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.stack([
        torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(seed_from_key(k)), dtype=dist.mean.dtype)
        for k in keys
    ]).to(dist.mean.device)
    return (dist.mean + dist.std * noise - shift) * scale


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _hash_and_key(batch: dict, spec: CacheSpec, max_pixels: int) -> dict:
    """CPU task: check each image's header, hash its bytes, derive its cache key and whether the cache already
    has a whole entry for it."""
    store = CacheStore(spec.cache_dir)
    keys, hits, errors = [], [], []
    for path, res, min_side in zip(batch["path"], batch["resolution"], batch["min_side"], strict=True):
        problem = image_problem(path, int(min_side), max_pixels)
        if problem:
            keys.append("")
            hits.append(False)
            errors.append(problem)
            continue
        try:
            k = spec.latent_key(hashlib.sha256(Path(path).read_bytes()).hexdigest(), int(res))
            keys.append(k)
            hits.append(store.has("latents", k))
            errors.append("")
        except OSError as e:
            keys.append("")
            hits.append(False)
            errors.append(f"unreadable: {e}")
    return {**batch, "latent_key": np.array(keys), "hit": np.array(hits), "error": np.array(errors)}


def _decode(batch: dict) -> dict:
    """CPU task: decode, resize and crop; a bad file becomes an error row instead of stopping the job."""
    res = int(batch["resolution"][0])
    pixels, errors = [], []
    for path in batch["path"]:
        try:
            pixels.append(load_image(path, res))
            errors.append("")
        except Exception as e:  # noqa: BLE001 - any decoder failure means: skip and report this file
            pixels.append(np.zeros((res, res, 3), np.uint8))
            errors.append(f"cannot decode: {type(e).__name__}: {e}")
    return {**batch, "pixels": np.stack(pixels), "error": np.array(errors)}


class VaeEncoder:
    """Actor: loads the VAE once, encodes batches of pixels and writes latents to the store."""

    def __init__(self, spec: CacheSpec):
        from raytune_sd3.models.loading import load_vae

        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
        self.spec, self.store = spec, CacheStore(spec.cache_dir)
        self.vae = load_vae(spec.pretrained, _device(), torch.float32, spec.revision)

    def __call__(self, batch: dict) -> dict:
        ok = np.array([e == "" for e in batch["error"]])
        encoded = np.zeros(len(ok), dtype=bool)
        if ok.any():
            keys = [k for k, good in zip(batch["latent_key"], ok, strict=True) if good]
            lat = encode_latents(self.vae, pixels_to_tensor(batch["pixels"][ok]), keys, self.spec.vae_shift,
                                 self.spec.vae_scale).to(DTYPES[self.spec.dtype])
            for k, t in zip(keys, lat, strict=True):
                self.store.write("latents", k, {"latents": t})
            encoded[ok] = True
        return {"path": batch["path"], "latent_key": batch["latent_key"], "error": batch["error"], "encoded": encoded}


class TextEncoder:
    """Actor: loads the three text encoders once, encodes batches of captions and writes embeddings to the store."""

    def __init__(self, spec: CacheSpec):
        from raytune_sd3.models.loading import load_text_encoders

        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
        self.spec, self.store = spec, CacheStore(spec.cache_dir)
        self.enc = load_text_encoders(spec.pretrained, _device(), DTYPES[spec.text_encoder_dtype], spec.revision)

    def __call__(self, batch: dict) -> dict:
        from raytune_sd3.models.text import encode_prompts

        captions = [str(c) for c in batch["caption"]]
        embeds, pooled = encode_prompts(self.enc, captions, self.spec.t5_max_length, self.spec.t5_padding)
        dt = DTYPES[self.spec.dtype]
        for k, e, p in zip(batch["text_key"], embeds, pooled, strict=True):
            self.store.write("text", str(k), {"prompt_embeds": e.to(dt), "pooled": p.to(dt)})
        return {"text_key": batch["text_key"]}


def _actor_options(n_actors: int | None) -> tuple[int, dict]:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return n_actors or gpus, {"num_gpus": 1}
    # Fractional CPUs: two 1-CPU actors on a 2-CPU node would starve the read tasks (a silent deadlock).
    return n_actors or 2, {"num_cpus": 0.5}


def build_cache(spec: CacheSpec, items: list[Item], extra_captions: list[str], batch_size: int = 8,
                n_actors: int | None = None, max_pixels: int = 250_000_000) -> CacheReport:
    """Encode what the cache lacks for `items` and `extra_captions` (validation prompts, the empty caption)."""
    import ray

    t0 = time.perf_counter()
    report = CacheReport()
    size, opts = _actor_options(n_actors)
    compute = ray.data.ActorPoolStrategy(size=size)
    task_opts = {"num_cpus": 0.25}

    keyed = ray.data.from_items([it.to_row() for it in items]).map_batches(
        _hash_and_key, fn_kwargs={"spec": spec, "max_pixels": max_pixels}, batch_size=64, **task_opts
    ).take_all()
    todo = [r for r in keyed if not r["hit"] and not r["error"]]
    done = {r["path"]: r for r in keyed if r["hit"]}
    report.latents_reused = len(done)
    report.skipped += [{"path": r["path"], "reason": r["error"]} for r in keyed if r["error"]]

    for res in sorted({r["resolution"] for r in todo}):  # a batch holds one image size
        group = [{k: r[k] for k in ("path", "caption", "dataset_id", "resolution", "latent_key")} for r in todo
                 if r["resolution"] == res]
        out = (ray.data.from_items(group)
               .map_batches(_decode, batch_size=batch_size, **task_opts)
               .map_batches(VaeEncoder, fn_constructor_args=(spec,), batch_size=batch_size, compute=compute, **opts)
               .take_all())
        for r in out:
            if r["encoded"]:
                done[r["path"]] = r
                report.latents_encoded += 1
            else:
                report.skipped.append({"path": r["path"], "reason": r["error"]})

    by_path = {it.path: it for it in items}
    captions = sorted({c for p in done for c in by_path[p].captions} | set(extra_captions))
    report.text_keys = {c: spec.text_key(c) for c in captions}
    store = CacheStore(spec.cache_dir)
    missing = [{"caption": c, "text_key": k} for c, k in report.text_keys.items() if not store.has("text", k)]
    report.texts_reused = len(captions) - len(missing)
    if missing:
        ray.data.from_items(missing).map_batches(
            TextEncoder, fn_constructor_args=(spec,), batch_size=batch_size, compute=compute, **opts
        ).take_all()
        report.texts_encoded = len(missing)

    for it in items:  # manifest rows in discovery order
        if it.path in done:
            report.rows.append({**it.to_row(), "latent_key": done[it.path]["latent_key"],
                                "text_key": report.text_keys[it.caption],
                                "text_keys": [report.text_keys[c] for c in it.captions]})
    report.seconds = time.perf_counter() - t0
    return report
