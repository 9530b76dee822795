"""The caching stage: Ray Data reads and crops images in CPU tasks and encodes them (VAE) and the captions (CLIP-L,
CLIP-G, T5) in actor pools, writing entries into the CacheStore. Entries already there are not encoded again.

    items -> [task] hash bytes, cache key, hit?  -> misses -> [task] decode, resize, crop (pixels.py)
          -> [VAE actors] -> store
    unique captions -> keys -> misses -> [text actors] -> store
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import io
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

import numpy as np
import torch

from raytune_sd3.data.buckets import Sizing, plan, seed_from_key
from raytune_sd3.data.discovery import Item
from raytune_sd3.data.index import ImageFacts, StatIndex
from raytune_sd3.data.pixels import decode_batch, image_size, size_problem
from raytune_sd3.data.reading import Sources, is_local, read_file
from raytune_sd3.data.store import CacheStore, latent_key, text_key
from raytune_sd3.models.loading import DTYPES
from raytune_sd3.progress import Progress

VAE_FACTOR = 8
log = logging.getLogger(__name__)


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

    def latent_key(self, image_sha256: str, sizing: str, mask_sha256: str = "", flipped: bool = False) -> str:
        return latent_key(image_sha256, sizing, self.vae_id, self.vae_shift, self.vae_scale, self.dtype,
                          mask_sha256, flipped)

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
    files_hashed: int = 0
    """Images and masks opened and hashed: new or changed since the stat index (data/index.py) recorded them."""
    files_from_index: int = 0
    """Images and masks whose stat matched the index: not opened."""
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("rows")
        d.pop("text_keys")
        d["items"] = len(self.rows)
        return d


def latent_mask(mask: np.ndarray) -> torch.Tensor:
    """(H, W) pixel mask -> (1, H/8, W/8): the mean over each 8x8 block, the pixels one latent position covers."""
    t = torch.from_numpy(np.ascontiguousarray(mask))[None, None]
    return torch.nn.functional.avg_pool2d(t, VAE_FACTOR)[0]


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


def _image_facts(path: str, known: ImageFacts | None, listed: tuple[int, int] | None = None,
                 sources: Sources | None = None) -> tuple[ImageFacts, int]:
    """The facts of an image file: `known` ones (from the stat index), or read now (stat, header, sha256 of the
    bytes) with the time of the stat, which the index needs to tell a racy record; 0 for known ones. An object of
    a store (`listed`: its size and mtime from the listing) is read whole once, from the store; its record is
    timed by the read, which came after the listing (a change between them changes the next listing's stat). A
    table's row has no stat: its bytes are read each run (with its other columns), and their hash is its identity;
    nothing is recorded for it (0)."""
    if known is not None:
        return known, 0
    if listed is not None or not is_local(path, sources):
        data, read_ns = read_file(path, sources)
        w, h = image_size(io.BytesIO(data))
        sha = hashlib.sha256(data).hexdigest()
        return (ImageFacts(sha, w, h, *listed), read_ns) if listed else (ImageFacts(sha, w, h, len(data), 0), 0)
    st = os.stat(path)
    stat_ns = time.time_ns()
    w, h = image_size(path)
    return ImageFacts(hashlib.sha256(Path(path).read_bytes()).hexdigest(), w, h, st.st_size, st.st_mtime_ns), stat_ns


def _at(batch: dict, column: str, i: int):
    return batch[column][i] if column in batch else None


def _listed(value) -> tuple[int, int] | None:
    """A row's `stat` or `mask_stat` column: (size, mtime_ns) from a store's listing, or None (a local file)."""
    return (int(value[0]), int(value[1])) if value is not None and len(value) == 2 else None


def _whole_entry(store: CacheStore, kind: str, key: str, index: StatIndex | None) -> int:
    """The entry's length when it is whole, else 0. An entry the index saw whole at its present length is not
    opened (one stat); any other has its header read."""
    recorded = index.entry_size(kind, key) if index is not None else None
    if recorded is not None and store.files.size(store.entry_path(kind, key)) == recorded:
        return recorded
    return store.whole_size(kind, key) or 0


def _hash_and_key(batch: dict, spec: CacheSpec, max_pixels: int, index: StatIndex | None = None,
                  flip: bool = False, sources: Sources | None = None) -> dict:
    """Check each image's size (and its mask's), hash their bytes, derive the cache key, the bucket size and
    whether the cache already has a whole entry (with `flip`, also the key of the mirrored entry and its length,
    `flip_key` and `flip_bytes`). A Ray task for a large data set (no index: what it read goes back
    in `learnt`, JSON, for the driver to record), or on the driver for rows whose facts the index held (`known`)."""
    store = CacheStore(spec.cache_dir)
    known = batch.get("known")
    out = {k: [] for k in ("latent_key", "hit", "error", "orig_width", "orig_height", "width", "height", "learnt",
                           "entry_bytes", "flip_key", "flip_bytes")}
    for i, (path, sizing, mask) in enumerate(zip(batch["path"], batch["sizing"], batch["mask_path"], strict=True)):
        image_known, mask_known = known[i] if known is not None else (None, None)
        path, sizing, mask = str(path), str(sizing), str(mask)
        key, size, orig, problem, learnt, entry, flip_key, flip_entry = "", (0, 0), (0, 0), "", [], 0, "", 0
        try:
            try:
                image, stat_ns = _image_facts(path, image_known, _listed(_at(batch, "stat", i)), sources)
            except Exception as e:  # noqa: BLE001 - not an image PIL can read: skip and report
                problem = f"not a readable image: {type(e).__name__}: {e}"
            else:
                learnt += [[path, *astuple(image), stat_ns]] if stat_ns else []
                problem = size_problem(image.width, image.height, _sizing(sizing), max_pixels)
            if not problem:
                orig = (image.width, image.height)
                mask_sha = ""
                if mask:
                    m, stat_ns = _image_facts(mask, mask_known, _listed(_at(batch, "mask_stat", i)), sources)
                    learnt += [[mask, *astuple(m), stat_ns]] if stat_ns else []
                    if (m.width, m.height) != orig:
                        problem = f"mask {Path(mask).name} is {(m.width, m.height)}, its image {orig}: they must match"
                    mask_sha = m.sha256
                key = spec.latent_key(image.sha256, sizing, mask_sha)
                flip_key = spec.latent_key(image.sha256, sizing, mask_sha, flipped=True) if flip else ""
                size = plan(*orig, _sizing(sizing), seed_from_key(key)).size
        except Exception as e:  # noqa: BLE001 - an unreadable file or mask: skip and report
            problem = problem or f"unreadable: {type(e).__name__}: {e}"
        if not problem:
            entry = _whole_entry(store, "latents", key, index)
            flip_entry = _whole_entry(store, "latents", flip_key, index) if flip_key else 0
        for name, value in zip(out, (key if not problem else "", bool(entry), problem, *orig, *size,
                                     json.dumps(learnt) if learnt else "", entry,
                                     flip_key if not problem else "", flip_entry), strict=True):
            out[name].append(value)
    return {**{k: v for k, v in batch.items() if k != "known"}, **{k: np.array(v) for k, v in out.items()}}


@functools.lru_cache(maxsize=64)
def _sizing(text: str) -> Sizing:
    return Sizing.from_json(text)


class VaeEncoder:
    """Actor: loads the VAE once, encodes batches of pixels and writes latents to the store."""

    def __init__(self, spec: CacheSpec):
        # imported here for start-up time: models.loading loads torch
        from raytune_sd3.models.loading import leave_out_bitsandbytes, load_vae

        leave_out_bitsandbytes()  # the cache's models are never quantised
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
        self.spec, self.store = spec, CacheStore(spec.cache_dir)
        self.vae = load_vae(spec.pretrained, _device(), torch.float32, spec.revision)

    def __call__(self, batch: dict) -> dict:
        ok = [i for i, e in enumerate(batch["error"]) if e == ""]
        encoded = np.zeros(len(batch["error"]), dtype=np.int64)  # the entry's length: the stat index records it
        sizes = {i: batch["pixels"][i].shape for i in ok}
        for size in sorted(set(sizes.values())):  # one VAE call per image size
            group = [i for i in ok if sizes[i] == size]
            keys = [str(batch["latent_key"][i]) for i in group]
            pixels = np.stack([batch["pixels"][i] for i in group])
            lat = encode_latents(self.vae, pixels_to_tensor(pixels), keys, self.spec.vae_shift,
                                 self.spec.vae_scale).to(DTYPES[self.spec.dtype])
            for i, k, t in zip(group, keys, lat, strict=True):
                has_mask = bool(batch["mask_path"][i])
                entry = {"latents": t, **({"mask": latent_mask(batch["mask"][i]).to(t.dtype)} if has_mask else {})}
                encoded[i] = self.store.write("latents", k, entry)
        return {"uid": batch["uid"], "path": batch["path"], "latent_key": batch["latent_key"], "error": batch["error"],
                "encoded": encoded, "flipped": batch["flipped"]}


class TextEncoder:
    """Actor: loads the three text encoders once, encodes batches of captions and writes embeddings to the store."""

    def __init__(self, spec: CacheSpec):
        # imported here for start-up time: models.loading loads torch
        from raytune_sd3.models.loading import leave_out_bitsandbytes, load_text_encoders

        leave_out_bitsandbytes()  # the cache's models are never quantised
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
        self.spec, self.store = spec, CacheStore(spec.cache_dir)
        self.enc = load_text_encoders(spec.pretrained, _device(), DTYPES[spec.text_encoder_dtype], spec.revision)

    def __call__(self, batch: dict) -> dict:
        # imported here for start-up time: models.text loads torch
        from raytune_sd3.models.text import encode_prompts

        captions = [str(c) for c in batch["caption"]]
        embeds, pooled = encode_prompts(self.enc, captions, self.spec.t5_max_length, self.spec.t5_padding)
        dt = DTYPES[self.spec.dtype]
        lengths = [self.store.write("text", str(k), {"prompt_embeds": e.to(dt), "pooled": p.to(dt)})
                   for k, e, p in zip(batch["text_key"], embeds, pooled, strict=True)]
        return {"text_key": batch["text_key"], "entry_bytes": np.array(lengths, dtype=np.int64)}


def _actor_options(n_actors: int | None, pools: int = 1) -> tuple[int, dict]:
    """(actors per pool, each actor's resources) when `pools` encoder pools run at once."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        # The pools share the GPUs: each actor takes a slice, so both pools fit at once even on one GPU (SD3.5's
        # three text encoders in bf16 and the VAE hold about 12 GB of weights together). Whole GPUs per actor let
        # one pool take the only GPU while the other waits for it. Slices are rounded down to Ray's 1e-4 grain.
        size = n_actors or gpus
        return size, {"num_gpus": min(1.0, math.floor(1e4 * gpus / (size * pools)) / 1e4)}
    # Fractional CPUs: two 1-CPU actors on a 2-CPU node would starve the read tasks (a silent deadlock). Without
    # GPUs one actor per 8 logical CPUs: each one's start (imports, model load) costs more than it adds on a laptop.
    return n_actors or max(1, int(ray.cluster_resources().get("CPU", 0)) // 8), {"num_cpus": 0.5}


def _blocks(n: int, batch_size: int) -> int:
    """Blocks for n rows: one batch each, up to Ray Data's default of 200 (from_items would make one row a block,
    and each block a task of its own)."""
    return max(1, min(200, math.ceil(n / batch_size)))


def _decoders() -> int:
    """Decode tasks at once: one per CPU the cluster has. Their fractional CPUs would let four run per CPU, each
    in a worker process of its own (imports, ~2.5 s of CPU to start) for work that is CPU-bound anyway."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _save(index: StatIndex) -> None:
    try:
        index.save()
    except Exception as e:  # noqa: BLE001 - a side feature: the next run hashes again, the cache is whole
        log.warning("could not save the cache's stat index (%s: %s); the next run re-hashes the images",
                    type(e).__name__, e)


LOCAL_HASHING = 4096  # up to this many images to read, the hashing runs in threads here, not Ray tasks


def _indexed(row: dict, index: StatIndex) -> tuple[ImageFacts, ImageFacts | None] | None:
    """The index's facts of the row's image (and mask) when their stat still matches, else None (read them). An
    object of a store is looked up by the stat its listing gave (no request)."""
    try:
        image = index.image(row["path"], *_stat(row["path"], row.get("stat")))
        if image is None or not row["mask_path"]:
            return None if image is None else (image, None)
        mask = index.image(row["mask_path"], *_stat(row["mask_path"], row.get("mask_stat")))
        return None if mask is None else (image, mask)
    except OSError:
        return None  # gone or unreadable since discovery: the hashing path reports why


def _stat(path: str, listed) -> tuple[int, int]:
    if (known := _listed(listed)) is not None:
        return known
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _in_threads(rows: list[dict], fn, chunk: int = 16) -> list[dict]:
    """`fn` over chunks of `rows` in threads (hashlib, PIL and pyarrow release the GIL); rows back in order."""
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    with ThreadPoolExecutor(8) as pool:
        batches = pool.map(lambda c: fn({k: [r[k] for r in c] for k in c[0]}), chunks)
        return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["path"]))]


def _keyed(rows: list[dict], spec: CacheSpec, max_pixels: int, task_opts: dict,
           index: StatIndex | None = None, flip: bool = False,
           sources: Sources | None = None) -> list[dict]:
    """`_hash_and_key` over every row, in input order. Rows whose image the index knows (stat unchanged) are keyed
    here without opening the image. The others are read: in Ray tasks across the cluster when there are many, in
    threads here when few, where starting Ray Data costs more than the hashing. What was read goes into `index`."""
    known, unknown = [], []
    with _gc_paused():
        for r in rows:
            facts = _indexed(r, index) if index is not None else None
            (known if facts else unknown).append({**r, "known": facts} if facts else r)
        # Known rows cost a stat of their entry each. In a store that is a request: threads, in large chunks, as the
        # per-chunk overhead would weigh more than the work. On a local disk it takes microseconds, and threads
        # only contend for the GIL: one pass here was ~2x faster than 8 threads (benchmarks/store.py, 2 cores).
        chunk = len(known) if CacheStore(spec.cache_dir).files.local else 1024
        out = (_in_threads(known, lambda b: _hash_and_key(b, spec, max_pixels, index, flip, sources), chunk)
               if known else [])
    if len(unknown) > LOCAL_HASHING:
        import ray

        out += ray.data.from_items(unknown).map_batches(
            _hash_and_key, fn_kwargs={"spec": spec, "max_pixels": max_pixels, "flip": flip, "sources": sources},
            batch_size=64, **task_opts
        ).take_all()
    elif unknown:
        out += _in_threads(unknown, lambda b: _hash_and_key(b, spec, max_pixels, flip=flip, sources=sources))
    with _gc_paused():
        if index is not None:
            for r in out:
                for path, *facts, stat_ns in json.loads(str(r["learnt"])) if r["learnt"] else []:
                    index.add_image(path, ImageFacts(*facts), stat_ns)
                if r["entry_bytes"]:
                    index.add_entry("latents", str(r["latent_key"]), int(r["entry_bytes"]))
                if r["flip_bytes"]:
                    index.add_entry("latents", str(r["flip_key"]), int(r["flip_bytes"]))
        return sorted(out, key=lambda r: int(r["uid"]))


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic GC paused (reference counting still frees all else). Keying builds a few dicts an image and
    keeps them all, so each of the GC's full passes walked the driver's whole heap (torch, transformers: ~400k
    objects) to free nothing: paused, 20,000 known images were keyed in ~35 instead of ~57 us each."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def build_cache(spec: CacheSpec, items: list[Item], extra_captions: list[str], batch_size: int = 8,
                n_actors: int | None = None, max_pixels: int = 250_000_000, random_flip: bool = False,
                sources: Sources | None = None) -> CacheReport:
    """Encode what the cache lacks for `items` and `extra_captions` (validation prompts, the empty caption). With
    `random_flip` each image also gets an entry of its mirrored pixels (the same crop, mirrored), under its own key
    (`flip_key` in its row; "" without one). `sources`: the store folders of items that are not local files
    (data/sources.py's sources_of); the tasks that hash and decode read them from there."""
    import ray

    t0 = time.perf_counter()
    report = CacheReport()
    task_opts = {"num_cpus": 0.25}

    store = CacheStore(spec.cache_dir)
    index = StatIndex.load(store.files)
    rows = [{**it.to_row(), "uid": i, "stat": list(it.stat or ()), "mask_stat": list(it.mask_stat or ())}
            for i, it in enumerate(items)]
    keyed = _keyed(rows, spec, max_pixels, task_opts, index, random_flip, sources)
    report.files_hashed = sum(len(json.loads(str(r["learnt"]))) for r in keyed if r["learnt"])
    report.files_from_index = index.hits
    # A mirrored entry is a row of its own: its key, and the plain key its crop is drawn from (the same crop).
    todo = [{**r, "crop_key": r["latent_key"], "flipped": False} for r in keyed if not r["hit"] and not r["error"]]
    todo += [{**r, "latent_key": r["flip_key"], "crop_key": r["latent_key"], "flipped": True} for r in keyed
             if r["flip_key"] and not r["flip_bytes"] and not r["error"]]
    done = {int(r["uid"]): r for r in keyed if r["hit"]}
    flipped = {int(r["uid"]) for r in keyed if r["flip_bytes"]}
    report.latents_reused = len(done) + len(flipped)
    report.skipped += [{"path": r["path"], "reason": r["error"]} for r in keyed if r["error"]]
    size_of = {int(r["uid"]): (int(r["width"]), int(r["height"])) for r in keyed}

    # The captions of every image whose header passed, encoded while the VAE runs: both pools start at once.
    captions = sorted({c for r in keyed if not r["error"] for c in items[int(r["uid"])].captions}
                      | set(extra_captions))
    report.text_keys = {c: spec.text_key(c) for c in captions}
    keys = list(report.text_keys.values())
    with ThreadPoolExecutor(8) as pool:  # stats or header reads; many at once on an object store
        chunks = pool.map(lambda c: [_whole_entry(store, "text", k, index) for k in c],
                          [keys[i:i + 256] for i in range(0, len(keys), 256)])
        present = [length for c in chunks for length in c]
    for k, length in zip(report.text_keys.values(), present, strict=True):
        if length:
            index.add_entry("text", k, length)
    missing = [{"caption": c, "text_key": k} for (c, k), hit in zip(report.text_keys.items(), present, strict=True)
               if not hit]
    report.texts_reused = len(captions) - len(missing)
    if todo or missing:  # a warm cache needs no encoder (nor Ray, unless many images were new)
        size, opts = _actor_options(n_actors, pools=bool(todo) + bool(missing))
        compute = ray.data.ActorPoolStrategy(size=size)
    with ThreadPoolExecutor(1) as background:  # waits for the caption pool on the way out, error or not
        texts = background.submit(lambda: ray.data.from_items(missing).map_batches(
            TextEncoder, fn_constructor_args=(spec,), batch_size=batch_size, compute=compute, **opts).take_all()
        ) if missing else None

        if todo:  # one pipeline for every bucket, sorted by size so that most batches hold one size
            todo.sort(key=lambda r: (size_of[int(r["uid"])], int(r["uid"])))
            group = [{k: r[k] for k in ("uid", "path", "mask_path", "sizing", "latent_key", "orig_width",
                                        "orig_height", "width", "height", "crop_key", "flipped")} for r in todo]
            encoded = (ray.data.from_items(group, override_num_blocks=_blocks(len(group), batch_size))
                       .map_batches(decode_batch, fn_kwargs={"sources": sources}, batch_size=batch_size,
                                    concurrency=_decoders(), **task_opts)
                       .map_batches(VaeEncoder, fn_constructor_args=(spec,), batch_size=batch_size, compute=compute,
                                    **opts))
            out = []
            with Progress("caching images", len(todo), "img") as bar:
                for r in encoded.iter_rows():
                    out.append(r)
                    bar.update()
            for r in out:
                if r["encoded"] and r["flipped"]:
                    flipped.add(int(r["uid"]))
                    index.add_entry("latents", str(r["latent_key"]), int(r["encoded"]))
                    report.latents_encoded += 1
                elif r["encoded"]:
                    done[int(r["uid"])] = r
                    index.add_entry("latents", str(r["latent_key"]), int(r["encoded"]))
                    report.latents_encoded += 1
                else:
                    report.skipped.append({"path": r["path"], "reason": r["error"]})
        if texts is not None:
            for r in texts.result():
                index.add_entry("text", str(r["text_key"]), int(r["entry_bytes"]))
            report.texts_encoded = len(missing)
    _save(index)

    flip_keys = {int(r["uid"]): str(r["flip_key"]) for r in keyed}
    for uid, it in enumerate(items):  # manifest rows in discovery order
        if uid in done:
            width, height = size_of[uid]
            report.rows.append({**it.to_row(), "latent_key": str(done[uid]["latent_key"]), "width": width,
                                "height": height, "regularisation": it.regularisation, "repeats": it.repeats,
                                "text_key": report.text_keys[it.caption],
                                "text_keys": [report.text_keys[c] for c in it.captions],
                                "flip_key": flip_keys[uid] if uid in flipped else ""})
    report.seconds = time.perf_counter() - t0
    return report
