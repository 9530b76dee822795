"""Cache files behind a URI (s3://, gs://, hdfs://, or any fsspec protocol): what CacheStore needs, on pyarrow.fs.

A local path stays on the plain-file path in store.py (temp file + rename). Here an entry is written in one
output stream: object stores publish an object only when its upload completes, so a reader never sees half an
entry. Options of the filesystem go in the URI's query (`s3://bucket/cache?endpoint_override=host:port&scheme=http`
for MinIO or another S3-compatible store); credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never
from the job file.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from raytune_sd3.config import is_uri  # noqa: F401 - the cache's URI test lives with the config that names URIs


def redacted(uri: str) -> str:
    """The URI without its query (which may name an endpoint or options) and any user:password@, for messages."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{parts.path}"


class UriFiles:
    """The few file operations the cache needs, on the filesystem a URI names."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        except Exception:  # noqa: BLE001 - pyarrow only knows its own schemes: try fsspec for the rest
            import fsspec

            fs, root = fsspec.core.url_to_fs(uri)
            self.fs, self.root = pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root
        self.root = self.root.rstrip("/")

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def size(self, path: str) -> int | None:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(path)
        return info.size if info.type == pafs.FileType.File else None

    def read_range(self, path: str, start: int, length: int) -> bytes:
        with self.fs.open_input_file(path) as f:
            return f.read_at(length, start)

    def read(self, path: str) -> bytes:
        with self.fs.open_input_file(path) as f:
            return f.readall()

    def write(self, path: str, data: bytes) -> None:
        """Whole or not at all: an object appears when its upload completes; a failed upload leaves nothing."""
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def files(self, folder: str, suffix: str) -> list[str]:
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.join(folder), recursive=True))
        except FileNotFoundError:
            return []
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
