"""The training-time reader: cached latents and embeddings in a deterministic order, one bucket per step.

Every optimizer step trains on one global batch of G = batch_size x grad_accum x workers samples from a single
bucket (one image size). Epoch e is a list of such batches, a function of (seed, e) only: each bucket's items
(repeated 1 + repeats times) are shuffled and cut into batches of G (the remainder waits for another epoch), and
the batches of all buckets are shuffled together. Step s is batch s mod S of epoch s // S; micro-step m of rank r
reads its slice (m*W + r)*B ... +B. So a run resumed at step s (or restarted on another number of workers with the
same G) sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from raytune_sd3.config import ConfigError
from raytune_sd3.data.manifest import Rows
from raytune_sd3.data.store import CacheStore


class BucketError(ConfigError):
    """A bucket that cannot fill one global batch (a job that cannot run: exit 2, one message); the message names
    it and what to change."""


def bucket_of(row: dict) -> tuple[int, int]:
    return int(row.get("width", 0)), int(row.get("height", 0))


def plan_buckets(rows: Rows | Sequence[dict], global_batch: int,
                 small_buckets: str = "error") -> tuple[list[np.ndarray], list[str]]:
    """Row indices per bucket (each repeated 1 + repeats times, in row order; buckets sorted by size), after
    applying the small-bucket policy; and a line per bucket that was too small (dropped or oversubscribed). Raises
    BucketError. Runs on columns: a million rows take a fraction of a second."""
    rows = Rows.of(rows)
    if not len(rows):
        return [], []
    width, height = rows.column("width", 0).astype(np.int64), rows.column("height", 0).astype(np.int64)
    sample = np.repeat(np.arange(len(rows)), 1 + rows.column("repeats", 0).astype(np.int64))
    sizes, bucket = np.unique(np.stack([width, height], axis=1).reshape(-1, 2), axis=0, return_inverse=True)
    bucket = bucket.reshape(-1)
    members = {(int(w), int(h)): sample[bucket[sample] == b] for b, (w, h) in enumerate(sizes)}
    dataset_ids = rows.column("dataset_id", "?")
    small = {b: len(m) for b, m in members.items() if len(m) < global_batch}
    notes = []
    for (w, h), n in sorted(small.items()):
        b = int(np.flatnonzero((sizes[:, 0] == w) & (sizes[:, 1] == h))[0])
        names = sorted({str(d) for d in dataset_ids[bucket == b]})
        notes.append(f"bucket {w}x{h} (data set {', '.join(names)}): {n} samples per epoch")
    if small and (small_buckets == "error" or len(small) == len(members) and small_buckets == "drop"):
        raise BucketError(
            f"{len(small)} of {len(members)} aspect bucket(s) cannot fill one global batch of {global_batch} "
            "samples (batch_size x grad_accum x workers; every optimizer step uses one bucket):\n  "
            + "\n  ".join(notes) + "\nAdd images of that shape or raise the data set's repeats, lower "
            "train.batch_size / grad_accum / num_workers, use fewer buckets (crop: true with crop_aspect square or "
            "closest, or a larger data.bucket_alignment), or set data.small_buckets to oversubscribe (repeat those "
            "images to fill a batch) or drop (train without them)")
    if small_buckets == "drop":
        members = {b: m for b, m in members.items() if b not in small}
    return [members[b] for b in sorted(members)], notes


class EntriesInMemory:
    """Cache entries kept decoded in RAM after their first read, up to `budget` bytes; once full, the rest are read
    from the store every time. No eviction: each epoch visits the data in a new random order, where evicting the
    least recently used would only churn. A data set that fits is read from the store once per run (as diffusers'
    script keeps its cached latents in memory), which matters most for a URI cache or a network filesystem.
    Callers must not modify the tensors they get."""

    def __init__(self, store: CacheStore, budget: int):
        self.store, self.budget, self.used = store, budget, 0
        self._entries: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def read(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        entry = self._entries.get((kind, key))
        if entry is None:
            entry = self.store.read(kind, key)
            size = sum(t.numel() * t.element_size() for t in entry.values())
            if self.used + size <= self.budget:
                self._entries[(kind, key)] = entry
                self.used += size
        return entry


class CachedBatches:
    def __init__(self, manifest: dict, rows: Rows | Sequence[dict], seed: int, caption_dropout: float = 0.0,
                 uncond: str = "empty_string", global_batch: int = 1, small_buckets: str = "error",
                 prior_loss_weight: float = 1.0, memory_budget: int = 0):
        rows = Rows.of(rows)
        if not len(rows):
            raise ValueError("no training items left (all held out for eval?): lower data.eval_samples")
        self.store = CacheStore(manifest["cache_dir"])
        self.entries = EntriesInMemory(self.store, memory_budget)
        self.rows, self.seed, self.global_batch = rows, seed, global_batch
        self.caption_dropout, self.uncond, self.prior_loss_weight = caption_dropout, uncond, prior_loss_weight
        self.uncond_key = manifest["uncond_key"]
        self.buckets, self.small_bucket_notes = plan_buckets(rows, global_batch, small_buckets)
        self.steps_per_epoch = sum(max(len(m) // global_batch, 1 if len(m) else 0) for m in self.buckets)
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches (row indices, one bucket each) of `epoch`, in training order."""
        if self._epoch is None or self._epoch[0] != epoch:
            g, batches = self.global_batch, []
            for b, members in enumerate(self.buckets):
                pool = members[np.random.default_rng([self.seed, epoch, b]).permutation(len(members))]
                if len(pool) < g:  # oversubscribed: its images repeated to fill one batch
                    pool = np.resize(pool, g)
                batches += [pool[i:i + g] for i in range(0, len(pool) - g + 1, g)]
            order = np.random.default_rng([self.seed, epoch, 1 << 20]).permutation(len(batches))
            self._epoch = (epoch, [batches[i] for i in order])
        return self._epoch[1]

    def load(self, rows: list[dict], dropped: list[bool] | None = None, text_keys: list[str] | None = None,
             latent_keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Stack the cache entries of `rows` (one bucket; with `text_keys`' captions, default each row's first); a
        dropped caption becomes the unconditional embedding. `loss_weight` is train.prior_loss_weight for
        regularisation samples, else 1; `mask` (masked loss) is there when any row has one (ones for the others)."""
        lat, masks, emb, pooled = [], [], [], []
        for i, r in enumerate(rows):
            entry = self.entries.read("latents", latent_keys[i] if latent_keys else r["latent_key"])
            lat.append(entry["latents"])
            masks.append(entry.get("mask"))
            drop = bool(dropped and dropped[i])
            t = self.entries.read("text", self.uncond_key if drop else (text_keys[i] if text_keys else r["text_key"]))
            if drop and self.uncond == "zero":
                t = {k: torch.zeros_like(v) for k, v in t.items()}
            emb.append(t["prompt_embeds"])
            pooled.append(t["pooled"])
        batch = {"latents": torch.stack(lat), "prompt_embeds": torch.stack(emb), "pooled": torch.stack(pooled),
                 "loss_weight": torch.tensor([self.prior_loss_weight if r.get("regularisation") else 1.0
                                              for r in rows])}
        if any(m is not None for m in masks):
            ones = torch.ones_like(lat[0][:1])
            batch["mask"] = torch.stack([m.to(ones.dtype) if m is not None else ones for m in masks])
        return batch

    def load_buckets(self, rows: Iterable[dict]) -> list[dict[str, torch.Tensor]]:
        """`rows` (e.g. the eval set) as one stacked batch per bucket, in a fixed order."""
        by_bucket: dict[tuple[int, int], list[dict]] = defaultdict(list)
        for r in sorted(rows, key=lambda r: r["latent_key"]):
            by_bucket[bucket_of(r)].append(r)
        return [self.load(by_bucket[b]) for b in sorted(by_bucket)]

    def micro_batch(self, step: int, micro: int, grad_accum: int, rank: int, world: int, batch_size: int):
        """The batch of rank `rank` at 0-based optimizer step `step`, micro-step `micro`."""
        if batch_size * grad_accum * world != self.global_batch:
            raise ValueError(f"{batch_size} x {grad_accum} x {world} is not the reader's global batch {self.global_batch}")
        batch = self.epoch_batches(step // self.steps_per_epoch)[step % self.steps_per_epoch]
        offset = (micro * world + rank) * batch_size
        positions = range(step * self.global_batch + offset, step * self.global_batch + offset + batch_size)
        rows = [self.rows[int(i)] for i in batch[offset:offset + batch_size]]
        dropped = [self.caption_dropout > 0 and np.random.default_rng([self.seed, 7, p]).random() < self.caption_dropout
                   for p in positions]
        return self.load(rows, dropped, [self.text_key_at(r, p) for r, p in zip(rows, positions, strict=True)],
                         [self.latent_key_at(r, p) for r, p in zip(rows, positions, strict=True)])

    def latent_key_at(self, row: dict, position: int) -> str:
        """The image used at `position`: its mirrored entry (data.random_flip) with probability 1/2, drawn from
        (seed, position) as the caption is, else the plain one."""
        if row.get("flip_key") and np.random.default_rng([self.seed, 13, position]).random() < 0.5:
            return row["flip_key"]
        return row["latent_key"]

    def text_key_at(self, row: dict, position: int) -> str:
        """The caption used at `position`: one of the row's captions, drawn from (seed, position), so each epoch
        may see another one and a resumed run sees the same."""
        keys = row.get("text_keys") or [row["text_key"]]
        return keys[int(np.random.default_rng([self.seed, 11, position]).integers(len(keys)))] if len(keys) > 1 else keys[0]


class Prefetcher:
    """The micro-batches `calls` (micro_batch's arguments, in training order) one by one. With `background`, a
    thread reads the next ones while the current one trains, pinned when `pin` so that the copy to the GPU can
    overlap compute. Without it each is read when asked for, as the loop does on CPU devices: there a Python thread
    beside the training thread saves nothing and can cost more (every torch op drops and retakes the GIL, and
    retaking it from a thread running Python waits up to the 5 ms switch interval). benchmarks/step.py on the tiny
    model, reading every batch from disk: ours/reference 1.14 with the thread, 1.06 without; with the batches in
    RAM (EntriesInMemory) 1.045 either way.

    `then(args, batch)` adds to each batch what else its step needs (the loop: its sigmas and noise), in the same
    thread, so that it is read ahead and pinned with the batch."""

    _END = object()

    def __init__(self, reader: CachedBatches, calls: Iterable[tuple], depth: int = 2, pin: bool = False,
                 background: bool = True, then: Callable[[tuple, dict], dict] | None = None):
        self.reader, self.pin, self.then = reader, pin, then
        self._calls = iter(calls)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, args=(self._calls,), name="prefetch", daemon=True)
            self._thread.start()

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, calls) -> None:
        try:
            for args in calls:
                batch = self._read(args)
                if self.pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
            self._put(e)

    def _read(self, args: tuple) -> dict[str, torch.Tensor]:
        batch = self.reader.micro_batch(*args)
        return self.then(args, batch) if self.then else batch

    def get(self) -> dict[str, torch.Tensor]:
        if self._thread is None:
            args = next(self._calls, None)
            if args is None:
                raise StopIteration("no more micro-batches were scheduled")
            return self._read(args)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is self._END:
            raise StopIteration("no more micro-batches were scheduled")
        return item

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
