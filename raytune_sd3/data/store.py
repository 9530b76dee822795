"""The on-disk cache of VAE latents and text embeddings: keys, paths, atomic checksummed entries.

An entry's key hashes everything that changes its content, so a changed image, resolution, crop, VAE, caption,
encoder, T5 length or padding mode is a different key (recomputed), never a stale hit:
    latents/<k[:2]>/<k>.safetensors  {"latents": (16, H/8, W/8), "mask": (1, H/8, W/8) with masked loss}
    text/<k[:2]>/<k>.safetensors     {"prompt_embeds": (77 + L, D), "pooled": (P,)}
    index/                           what a warm start need not read again (data/index.py)
Each entry carries the sha256 of its tensor bytes in its safetensors metadata. `has`/`whole_size` check cheaply
that an entry is whole (header readable, file as long as the header says; a warm run reads no header for an entry
the index saw whole at its present length); `verify` (the cache CLI's --verify) recomputes the checksum.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import torch
from safetensors.torch import load, save

from raytune_sd3.data.files import CacheFiles, redacted

CACHE_FORMAT = 3  # bump when the meaning of an entry changes (2: checksummed entries; 3: buckets, masks)
CHECKSUM = "sha256"


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True).encode()).hexdigest()[:32]


def latent_key(image_sha256: str, sizing: str, vae_id: str, shift: float, scale: float, dtype: str,
               mask_sha256: str = "", flipped: bool = False) -> str:
    """`sizing` is the JSON of the data set's resolution, resolution type, crop and bucket settings; `flipped`: the
    entry of the horizontally mirrored image (data.random_flip; in the key only when set, so the keys of unflipped
    entries written before it existed still match)."""
    fields = {"kind": "latents", "image": image_sha256, "sizing": sizing, "vae": vae_id, "shift": shift,
              "scale": scale, "dtype": dtype, "mask": mask_sha256}
    return _hash({**fields, "flipped": True} if flipped else fields)


def text_key(caption: str, encoder_ids: list[str], t5_max_length: int, t5_padding: str, dtype: str,
             encoder_dtype: str) -> str:
    return _hash({"kind": "text", "caption": caption, "encoders": encoder_ids, "t5_max_length": t5_max_length,
                  "t5_padding": t5_padding, "dtype": dtype, "encoder_dtype": encoder_dtype})


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _parse_header(read) -> tuple[dict, int] | None:
    """A safetensors header and the file length it implies, via `read(start, length)`; None when unreadable.
    (Read by hand, not with safetensors.safe_open: that opens a local file whole, and an entry may be on s3://,
    where two ranged reads are all a whole-or-truncated check needs.)"""
    try:
        (n,) = struct.unpack("<Q", read(0, 8))
        if n > 100_000_000:
            return None
        header = json.loads(read(8, n))
    except (OSError, ValueError, struct.error):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return header, 8 + n + max(ends, default=0)


class CacheStore:
    """Reads and atomically writes entries under one cache location: a folder (every node must see it on a
    cluster) or a URI such as s3://bucket/cache, both through one pyarrow filesystem (data/files.py)."""

    def __init__(self, root: str | Path):
        self.files = CacheFiles(str(root))
        self.name = redacted(str(root))

    def path(self, kind: str, key: str) -> Path | str:
        """Where the entry lives: a Path for a local cache (for people and tests), else the filesystem's path."""
        path = self.entry_path(kind, key)
        return Path(path) if self.files.local else path

    def entry_path(self, kind: str, key: str) -> str:
        """The entry's path in the cache's filesystem."""
        return self.files.join(kind, key[:2], f"{key}.safetensors")

    def has(self, kind: str, key: str) -> bool:
        """True for a whole entry: a truncated or unreadable one counts as missing (and is encoded again)."""
        return self.whole_size(kind, key) is not None

    def whole_size(self, kind: str, key: str) -> int | None:
        """The entry's length when it is whole (header readable, file as long as the header says), else None."""
        path = self.entry_path(kind, key)
        try:
            size = self.files.size(path)
            parsed = None if size is None else _parse_header(lambda s, n: self.files.read_range(path, s, n))
        except OSError:
            return None
        if parsed is None:
            return None
        header, length = parsed
        return size if CHECKSUM in (header.get("__metadata__") or {}) and size == length else None

    def write(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> int:
        """Whole or not at all: readers see no entry or the whole one (CacheFiles.write). Returns its length."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        data = save(tensors, metadata={CHECKSUM: tensors_digest(tensors)})
        self.files.write(self.entry_path(kind, key), data)
        return len(data)

    def read(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        return load(self.files.read(self.entry_path(kind, key)))

    def remove(self, kind: str, key: str) -> None:
        self.files.delete(self.entry_path(kind, key))

    def verify(self, kind: str, key: str) -> str | None:
        """What is wrong with an entry ("missing", "truncated", "checksum mismatch", ...), or None when it is good."""
        path = self.entry_path(kind, key)
        if self.files.size(path) is None:
            return "missing"
        if not self.has(kind, key):
            return "truncated or unreadable"
        try:
            data = self.files.read(path)
            header, _ = _parse_header(lambda s, n: data[s:s + n])
            expected = (header.get("__metadata__") or {}).get(CHECKSUM)
            tensors = load(data)
        except Exception as e:  # noqa: BLE001 - any reader failure means the entry is bad
            return f"unreadable: {type(e).__name__}"
        return None if tensors_digest(tensors) == expected else "checksum mismatch"

    def entries(self) -> list[tuple[str, str]]:
        """(kind, key) of every entry stored."""
        return [(kind, p.rsplit("/", 1)[-1].removesuffix(".safetensors")) for kind in ("latents", "text")
                for p in self.files.files(kind, ".safetensors") if _is_entry(p, kind, self.files.join(kind))]

    def remove_stale_temporaries(self, older_than_s: float = 3600) -> int:
        """Delete half-written files that a process killed mid-write left behind (older than `older_than_s`, so a
        job writing into the same cache right now keeps its own); returns how many. An object store has none: an
        upload that did not finish leaves no object."""
        if self.files.uploads_whole:
            return 0  # and a listing of every object would cost a request per thousand entries
        cutoff = time.time() - older_than_s
        removed = 0
        for kind in ("latents", "text"):
            for info in self.files.listing(kind):
                name = info.path.rsplit("/", 1)[-1]
                if name.startswith(".") and name.endswith(".tmp") and info.mtime is not None \
                        and info.mtime.timestamp() < cutoff:
                    try:
                        self.files.delete(info.path)
                        removed += 1
                    except OSError:
                        pass
        return removed


def _is_entry(path: str, kind: str, folder: str) -> bool:
    """<folder>/<k[:2]>/<k>.safetensors, as `path` writes them (not a temp file, nothing deeper)."""
    rel = path[len(folder) + 1:].split("/")
    return len(rel) == 2 and not rel[1].startswith(".")
