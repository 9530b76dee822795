"""The on-disk cache of VAE latents and text embeddings: keys, paths, atomic writes.

An entry's key hashes everything that changes its content, so a changed image, resolution, crop, VAE, caption,
encoder, T5 length or padding mode is a different key (recomputed), never a stale hit:
    latents/<k[:2]>/<k>.safetensors  {"latents": (16, H/8, W/8)}
    text/<k[:2]>/<k>.safetensors     {"prompt_embeds": (77 + L, D), "pooled": (P,)}
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CACHE_FORMAT = 1  # bump when the meaning of an entry changes


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True).encode()).hexdigest()[:32]


def latent_key(image_sha256: str, resolution: int, crop: str, vae_id: str, shift: float, scale: float,
               dtype: str) -> str:
    return _hash({"kind": "latents", "image": image_sha256, "resolution": resolution, "crop": crop, "vae": vae_id,
                  "shift": shift, "scale": scale, "dtype": dtype})


def text_key(caption: str, encoder_ids: list[str], t5_max_length: int, t5_padding: str, dtype: str) -> str:
    return _hash({"kind": "text", "caption": caption, "encoders": encoder_ids, "t5_max_length": t5_max_length,
                  "t5_padding": t5_padding, "dtype": dtype})


def seed_from_key(key: str) -> int:
    """A per-entry seed (for the VAE's posterior sample), independent of batching and of which worker encodes it."""
    return int(key[:15], 16)


class CacheStore:
    """Reads and atomically writes entries under one cache directory (a path every node can see on a cluster)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def write(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        dest = self.path(kind, key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
            os.replace(tmp, dest)  # atomic: readers see the old state or the whole entry
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        return load_file(self.path(kind, key))
