"""The cache's files on one pyarrow FileSystem: a local folder, or a URI (s3://, gs://, hdfs://, or any fsspec
protocol). CacheStore and the stat index speak only to this class, so a folder and a bucket take the same path.

Writes are whole or absent. Object stores (S3, GCS, Azure) publish an object only when its upload completes, so an
entry is uploaded once under its name (a temp name + move would be a server-side copy and a delete). Elsewhere (a
folder, HDFS, ...) a file is visible while it is written, so it is written under a temp name beside its
destination and moved into place: a rename, atomic on POSIX filesystems. Options of a URI's filesystem go in its
query (`s3://bucket/cache?endpoint_override=host:port&scheme=http` for MinIO or another S3-compatible store);
credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never from the job file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from raytune_sd3.config import is_uri  # noqa: F401 - the cache's URI test lives with the config that names URIs

# fsspec protocols whose objects appear only when their upload completes.
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
# Schemes pyarrow's own clients serve (a network or credentials error from them is final, not a cue for fsspec).
_PYARROW_SCHEMES = {"s3", "gs", "gcs"}


def redacted(uri: str) -> str:
    """The URI without its query (which may name an endpoint or options) and any user:password@, for messages;
    a local path as it is."""
    if not is_uri(uri):
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{parts.path}"


# How long a store opened now retries a failing request; set only while the driver checks (stores_retried_for).
_retry_limit_s: float | None = None


@contextmanager
def stores_retried_for(seconds: float) -> Iterator[None]:
    """Within it, every store this process opens (filesystem(): data folders, tables, shards, metadata files, masks)
    gives up on a request after retrying it for `seconds` instead of its client's default (GCS: minutes), so the
    driver's checks say in seconds that an endpoint does not answer or that credentials are missing.
    Process-wide rather than a context variable: the data modules open stores in thread pools, which a context
    variable does not reach. Ray's tasks run in processes of their own and keep the default, longer retries."""
    global _retry_limit_s
    before, _retry_limit_s = _retry_limit_s, seconds
    try:
        yield
    finally:
        _retry_limit_s = before


def retry_limit() -> float | None:
    """The bound stores_retried_for sets now, None outside it (for a cache of clients: one per bound)."""
    return _retry_limit_s


def filesystem(location: str, retry_limit_s: float | None = None) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, root path in it, whether an upload publishes a file whole) for a folder or a URI.
    `retry_limit_s`: how long a GCS client retries before it gives up (its default is minutes; by default the bound
    of stores_retried_for, where one is set), unless the URI's query sets retry_limit_seconds. pyarrow takes no
    such option for S3, whose client gives up after a few attempts of seconds each."""
    if not is_uri(location):
        # pyarrow's local paths are absolute; a relative cache_dir means this process's working directory.
        return pafs.LocalFileSystem(), os.path.abspath(location), False
    scheme = urlsplit(location).scheme
    retry_limit_s = _retry_limit_s if retry_limit_s is None else retry_limit_s
    if retry_limit_s is not None and scheme in ("gs", "gcs") and "retry_limit_seconds=" not in location:
        location += ("&" if "?" in location else "?") + f"retry_limit_seconds={retry_limit_s:g}"
    try:
        fs, root = pafs.FileSystem.from_uri(location)
        return fs, root, fs.type_name in ("s3", "gcs", "abfs")
    except Exception as e:  # noqa: BLE001 - pyarrow only knows its own schemes: try fsspec for the rest
        if scheme in _PYARROW_SCHEMES and not isinstance(e, ImportError | NotImplementedError):
            raise  # pyarrow's own client refused the URI or could not reach it: that is the reason to give
        return _fsspec_filesystem(location)


def _fsspec_filesystem(location: str) -> tuple[pafs.FileSystem, str, bool]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(location)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root, bool(protocols & _OBJECT_STORES)


class CacheFiles:
    """The few file operations the cache needs, on the filesystem a folder or URI names. Paths are the
    filesystem's own ("/abs/cache/latents/ab/ab...safetensors", "bucket/cache/latents/...")."""

    def __init__(self, location: str, retry_limit_s: float | None = None):
        self.fs, root, self.uploads_whole = filesystem(str(location), retry_limit_s)
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def size(self, path: str) -> int | None:
        """The file's length, or None when there is no file at `path`."""
        info = self.fs.get_file_info(path)
        return info.size if info.type == pafs.FileType.File else None

    def read_range(self, path: str, start: int, length: int) -> bytes:
        with self.fs.open_input_file(path) as f:
            return f.read_at(length, start)

    def read(self, path: str) -> bytes:
        with self.fs.open_input_file(path) as f:
            return f.readall()

    def write(self, path: str, data: bytes) -> None:
        """Whole or not at all (see the module's docstring). Neither path fsyncs (pyarrow's local streams do not,
        and the plain-file writes before them did not either): a power cut may lose a recent entry, which the next
        run then finds missing and encodes again, but no reader sees half of one."""
        folder, name = path.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        if self.uploads_whole:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)  # LocalFileSystem: rename(2), which replaces `path` atomically on POSIX
        finally:
            if self.size(tmp) is not None:
                self.fs.delete_file(tmp)

    def delete(self, path: str) -> None:
        """Remove the file at `path`; nothing when there is none."""
        if self.size(path) is not None:
            self.fs.delete_file(path)

    def listing(self, folder: str) -> list[pafs.FileInfo]:
        """Every file under `folder` (recursive; sizes and modification times included), sorted by path."""
        # allow_not_found: a folder not written yet is empty (GCS says so with an OSError, not FileNotFoundError)
        infos = self.fs.get_file_info(pafs.FileSelector(self.join(folder), recursive=True, allow_not_found=True))
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)

    def files(self, folder: str, suffix: str) -> list[str]:
        return [i.path for i in self.listing(folder) if i.path.endswith(suffix)]
