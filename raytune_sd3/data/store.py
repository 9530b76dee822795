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
from safetensors.torch import load, load_file, save, save_file

from raytune_sd3.data.remote import UriFiles, is_uri, redacted

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


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _parse_header(read) -> tuple[dict, int] | None:
    """A safetensors header and the file length it implies, via `read(start, length)`; None when unreadable."""
    try:
        (n,) = struct.unpack("<Q", read(0, 8))
        if n > 100_000_000:
            return None
        header = json.loads(read(8, n))
    except (OSError, ValueError, struct.error):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return header, 8 + n + max(ends, default=0)


def _header(path: Path) -> tuple[dict, int] | None:
    try:
        with open(path, "rb") as f:
            return _parse_header(lambda start, length: (f.seek(start), f.read(length))[1])
    except OSError:
        return None


class CacheStore:
    """Reads and atomically writes entries under one cache location: a folder (every node must see it on a
    cluster) or a URI such as s3://bucket/cache (data/remote.py)."""

    def __init__(self, root: str | Path):
        self.remote = UriFiles(str(root)) if is_uri(str(root)) else None
        self.root = None if self.remote else Path(root)
        self.name = redacted(str(root)) if self.remote else str(root)

    def path(self, kind: str, key: str) -> Path | str:
        rel = f"{kind}/{key[:2]}/{key}.safetensors"
        return self.remote.join(rel) if self.remote else self.root / rel

    def has(self, kind: str, key: str) -> bool:
        """True for a whole entry: a truncated or unreadable one counts as missing (and is encoded again)."""
        path = self.path(kind, key)
        try:
            if self.remote:
                size = self.remote.size(path)
                parsed = None if size is None else _parse_header(lambda s, n: self.remote.read_range(path, s, n))
            else:
                parsed = _header(path)
                size = path.stat().st_size if parsed else None
        except OSError:
            return False
        if parsed is None:
            return False
        header, length = parsed
        return CHECKSUM in (header.get("__metadata__") or {}) and size == length

    def write(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        metadata = {CHECKSUM: tensors_digest(tensors)}
        if self.remote:  # one upload: the object appears whole or not at all
            self.remote.write(self.path(kind, key), save(tensors, metadata=metadata))
            return
        dest = self.path(kind, key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, dest)  # atomic: readers see the old state or the whole entry
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        if self.remote:
            return load(self.remote.read(self.path(kind, key)))
        return load_file(self.path(kind, key))

    def remove(self, kind: str, key: str) -> None:
        path = self.path(kind, key)
        if self.remote:
            if self.remote.size(path) is not None:
                self.remote.fs.delete_file(path)
        else:
            path.unlink(missing_ok=True)

    def verify(self, kind: str, key: str) -> str | None:
        """What is wrong with an entry ("missing", "truncated", "checksum mismatch", ...), or None when it is good."""
        path = self.path(kind, key)
        exists = self.remote.size(path) is not None if self.remote else path.exists()
        if not exists:
            return "missing"
        if not self.has(kind, key):
            return "truncated or unreadable"
        try:
            data = self.remote.read(path) if self.remote else Path(path).read_bytes()
            header, _ = _parse_header(lambda s, n: data[s:s + n])
            expected = (header.get("__metadata__") or {}).get(CHECKSUM)
            tensors = load(data)
        except Exception as e:  # noqa: BLE001 - any reader failure means the entry is bad
            return f"unreadable: {type(e).__name__}"
        return None if tensors_digest(tensors) == expected else "checksum mismatch"

    def entries(self) -> list[tuple[str, str]]:
        """(kind, key) of every entry stored."""
        if self.remote:
            return [(kind, p.rsplit("/", 1)[-1].removesuffix(".safetensors")) for kind in ("latents", "text")
                    for p in self.remote.files(kind, ".safetensors")]
        return [(p.parent.parent.name, p.stem) for kind in ("latents", "text")
                for p in sorted((self.root / kind).glob("*/*.safetensors"))]

    def remove_stale_temporaries(self, older_than_s: float = 3600) -> int:
        """Delete half-written files that a process killed mid-write left behind (older than `older_than_s`, so a
        job writing into the same cache right now keeps its own); returns how many. A URI cache has none: an
        upload that did not finish leaves no object."""
        import time

        if self.remote:
            return 0
        removed = 0
        for tmp in self.root.glob("*/*/.*.tmp"):
            try:
                if time.time() - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    removed += 1
            except OSError:
                pass
        return removed
