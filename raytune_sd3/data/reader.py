"""The training-time reader: cached latents and embeddings in a deterministic order.

The sample stream is a function of (seed, position) only: position p is item perm_e[p mod N] of epoch e = p // N.
Optimizer step s, micro-step m, rank r reads positions ((s*A + m)*W + r)*B ... +B, so a run resumed at step s (or
restarted on other workers) sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from raytune_sd3.data.store import CacheStore

MANIFEST = "manifest.json"


def write_manifest(path: Path, rows: list[dict], uncond_key: str, validation: list[dict], cache_dir: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cache_dir": cache_dir, "uncond_key": uncond_key, "validation": validation,
                               "rows": rows}))
    tmp.replace(path)


def read_manifest(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def split_eval(rows: list[dict], eval_samples: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): the eval rows are the first `eval_samples` by content key, stable across runs and machines."""
    ordered = sorted(rows, key=lambda r: r["latent_key"])
    eval_rows = ordered[:eval_samples]
    held = {r["latent_key"] for r in eval_rows}
    return [r for r in rows if r["latent_key"] not in held], eval_rows


class CachedBatches:
    def __init__(self, manifest: dict, rows: list[dict], seed: int, caption_dropout: float = 0.0,
                 uncond: str = "empty_string"):
        if not rows:
            raise ValueError("no training items left (all held out for eval?): lower data.eval_samples")
        self.store = CacheStore(manifest["cache_dir"])
        self.rows, self.seed = rows, seed
        self.caption_dropout, self.uncond = caption_dropout, uncond
        self.uncond_key = manifest["uncond_key"]
        self._perms: dict[int, np.ndarray] = {}

    def _item(self, position: int) -> int:
        n = len(self.rows)
        epoch = position // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
        return int(self._perms[epoch][position % n])

    def load(self, rows: list[dict], dropped: list[bool] | None = None,
             text_keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Stack the cache entries of `rows` (with `text_keys`' captions, default each row's first); a dropped
        caption becomes the unconditional embedding."""
        lat, emb, pooled = [], [], []
        for i, r in enumerate(rows):
            lat.append(self.store.read("latents", r["latent_key"])["latents"])
            drop = bool(dropped and dropped[i])
            t = self.store.read("text", self.uncond_key if drop else (text_keys[i] if text_keys else r["text_key"]))
            if drop and self.uncond == "zero":
                t = {k: torch.zeros_like(v) for k, v in t.items()}
            emb.append(t["prompt_embeds"])
            pooled.append(t["pooled"])
        return {"latents": torch.stack(lat), "prompt_embeds": torch.stack(emb), "pooled": torch.stack(pooled)}

    def micro_batch(self, step: int, micro: int, grad_accum: int, rank: int, world: int, batch_size: int):
        """The batch of rank `rank` at 0-based optimizer step `step`, micro-step `micro`."""
        start = ((step * grad_accum + micro) * world + rank) * batch_size
        positions = range(start, start + batch_size)
        rows = [self.rows[self._item(p)] for p in positions]
        dropped = [self.caption_dropout > 0 and np.random.default_rng([self.seed, 7, p]).random() < self.caption_dropout
                   for p in positions]
        return self.load(rows, dropped, [self.text_key_at(r, p) for r, p in zip(rows, positions, strict=True)])

    def text_key_at(self, row: dict, position: int) -> str:
        """The caption used at `position`: one of the row's captions, drawn from (seed, position), so each epoch
        may see another one and a resumed run sees the same."""
        keys = row.get("text_keys") or [row["text_key"]]
        return keys[int(np.random.default_rng([self.seed, 11, position]).integers(len(keys)))] if len(keys) > 1 else keys[0]
