"""The on-disk cache of VAE latents and text embeddings: keys, paths, atomic checksummed entries.

An entry's key hashes everything that changes its content, so a changed image, resolution, crop, VAE, caption,
encoder, T5 length or padding mode is a different key (recomputed), never a stale hit:
    latents/<k[:2]>/<k>.safetensors  {"latents": (16, H/8, W/8), "mask": (1, H/8, W/8) with masked loss}
    text/<k[:2]>/<k>.safetensors     {"prompt_embeds": (77 + L, D), "pooled": (P,)}
Each entry carries the sha256 of its tensor bytes in its safetensors metadata. `has` (every run, for every item)
checks cheaply that an entry is whole (header readable, file as long as the header says); `verify` (the cache
CLI's --verify) recomputes the checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CACHE_FORMAT = 3  # bump when the meaning of an entry changes (2: checksummed entries; 3: buckets, masks)
CHECKSUM = "sha256"


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True).encode()).hexdigest()[:32]


def latent_key(image_sha256: str, sizing: str, vae_id: str, shift: float, scale: float, dtype: str,
               mask_sha256: str = "") -> str:
    """`sizing` is the JSON of the data set's resolution, resolution type, crop and bucket settings."""
    return _hash({"kind": "latents", "image": image_sha256, "sizing": sizing, "vae": vae_id, "shift": shift,
                  "scale": scale, "dtype": dtype, "mask": mask_sha256})


def text_key(caption: str, encoder_ids: list[str], t5_max_length: int, t5_padding: str, dtype: str,
             encoder_dtype: str) -> str:
    return _hash({"kind": "text", "caption": caption, "encoders": encoder_ids, "t5_max_length": t5_max_length,
                  "t5_padding": t5_padding, "dtype": dtype, "encoder_dtype": encoder_dtype})


def seed_from_key(key: str) -> int:
    """A per-entry seed (for the VAE's posterior sample), independent of batching and of which worker encodes it."""
    return int(key[:15], 16)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _header(path: Path) -> tuple[dict, int] | None:
    """A safetensors file's header and the file length it implies; None when the header is unreadable."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return header, 8 + n + max(ends, default=0)


class CacheStore:
    """Reads and atomically writes entries under one cache directory (a path every node can see on a cluster)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        """True for a whole entry: a truncated or unreadable one counts as missing (and is encoded again)."""
        path = self.path(kind, key)
        parsed = _header(path)
        if parsed is None:
            return False
        header, length = parsed
        try:
            return CHECKSUM in (header.get("__metadata__") or {}) and path.stat().st_size == length
        except OSError:
            return False

    def write(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        dest = self.path(kind, key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={CHECKSUM: tensors_digest(tensors)})
            os.replace(tmp, dest)  # atomic: readers see the old state or the whole entry
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        return load_file(self.path(kind, key))

    def verify(self, kind: str, key: str) -> str | None:
        """What is wrong with an entry ("missing", "truncated", "checksum mismatch", ...), or None when it is good."""
        path = self.path(kind, key)
        if not path.exists():
            return "missing"
        if not self.has(kind, key):
            return "truncated or unreadable"
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                expected = (f.metadata() or {}).get(CHECKSUM)
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iter
        except Exception as e:  # noqa: BLE001 - any reader failure means the entry is bad
            return f"unreadable: {type(e).__name__}"
        return None if tensors_digest(tensors) == expected else "checksum mismatch"

    def entries(self) -> list[tuple[str, str]]:
        """(kind, key) of every entry on disk."""
        return [(p.parent.parent.name, p.stem) for kind in ("latents", "text")
                for p in sorted((self.root / kind).glob("*/*.safetensors"))]

    def remove_stale_temporaries(self, older_than_s: float = 3600) -> int:
        """Delete half-written files that a process killed mid-write left behind (older than `older_than_s`, so a
        job writing into the same cache right now keeps its own); returns how many."""
        import time

        removed = 0
        for tmp in self.root.glob("*/*/.*.tmp"):
            try:
                if time.time() - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    removed += 1
            except OSError:
                pass
        return removed
