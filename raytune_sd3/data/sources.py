"""A data set's folder in object storage (s3://, gs://, or another pyarrow/fsspec filesystem): listing it, reading
its objects, naming them.

An object is named in messages, the manifest, the cache report and the stat index by its URI without the query or
credentials (`s3://bucket/prefix/a.png`, data/files.py's `redacted`). The full location (endpoint, options) is kept
apart, as `sources` {folder name: location}, and goes only to the tasks that read: each opens the store itself, so
no node needs a copy of the images.

Listing: S3's ListObjectsV2 returns 1,000 keys a page, each page asking for the next, so one recursive listing is
one stream of requests however many threads wait on it (pyarrow's recursive FileSelector on S3 is that stream).
`DataFolder.listing` walks the first levels of sub-folders (one delimited request each) until it has enough of
them, then lists each sub-folder's tree in its own thread (pyarrow's calls release the GIL): a data set kept in
sub-folders is listed that many streams at once. A flat prefix of a million objects stays one stream: S3 offers no
way to split it without knowing its keys. GCS is listed as one recursive stream: pyarrow's one-level listing there
reports only the sub-folders that have a marker object (which `gcloud storage cp -r` and most uploaders never
write), so a walk would miss the images in all the others.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from raytune_sd3.data.files import filesystem, redacted, retry_limit

LIST_THREADS = 16  # listings in flight at once; each is a chain of HTTP requests, so threads wait, not compute
SPLIT_DEPTH = 3  # folder levels walked (one delimited request each) looking for sub-folders to list in parallel
READ_THREADS = 32  # small objects (caption files) read at once on the driver


class DataFolder:
    """A folder of a data set in a store, given as a URI with its options (`s3://bucket/prefix?endpoint_override=
    host:9000&scheme=http`). `name` is how its objects are named (no query, no credentials)."""

    def __init__(self, location: str):
        self.location = location
        self.name = redacted(location).rstrip("/")
        self.fs, root, _ = filesystem(location)
        self.root = root.rstrip("/")

    def name_of(self, fs_path: str) -> str:
        """The object's name (s3://bucket/prefix/a.png) from its path in the filesystem (bucket/prefix/a.png)."""
        return self.name + fs_path[len(self.root):]

    def fs_path(self, name: str) -> str:
        return self.root + name[len(self.name):]

    def problem(self) -> str | None:
        """Why the folder cannot be listed (no such bucket or prefix, credentials refused, no answer), or None.
        One request: run before any work."""
        try:
            info = self.fs.get_file_info(self.root)
        except Exception as e:  # noqa: BLE001 - any client error is the reason to give
            return f"{self.name} cannot be read; {CREDENTIALS_FIX} ({type(e).__name__}: {_first_line(e)})"
        if info.type == pafs.FileType.NotFound:
            return f"{self.name} does not exist (no bucket of that name, or nothing under that prefix)"
        if info.type != pafs.FileType.Directory:
            return f"{self.name} is an object, not a folder: give the prefix its images are under"
        return None

    def listing(self) -> list[pafs.FileInfo]:
        """Every object under the folder (sizes and modification times included), in no particular order."""
        if self.fs.type_name == "gcs":  # no walk (see the module's docstring)
            return [i for i in self._list_tree(self.root) if i.type == pafs.FileType.File]
        files, frontier = [], [self.root]
        with ThreadPoolExecutor(LIST_THREADS) as pool:
            for _ in range(SPLIT_DEPTH):
                if len(frontier) >= LIST_THREADS:
                    break
                level = [i for infos in pool.map(self._list_one_level, frontier) for i in infos]
                files += [i for i in level if i.type == pafs.FileType.File]
                frontier = [i.path for i in level if i.type == pafs.FileType.Directory]
                if not frontier:
                    return files
            for infos in pool.map(self._list_tree, frontier):
                files += [i for i in infos if i.type == pafs.FileType.File]
        return files

    def _list_one_level(self, path: str) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(path, recursive=False))

    def _list_tree(self, path: str) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(path, recursive=True))

    def read(self, name: str) -> bytes:
        with self.fs.open_input_file(self.fs_path(name)) as f:
            return f.readall()

    def read_many(self, names: list[str]) -> list[bytes]:
        """The objects' bytes, read READ_THREADS at once (caption files: a request each)."""
        with ThreadPoolExecutor(READ_THREADS) as pool:
            return list(pool.map(self.read, names))


CREDENTIALS_FIX = ("check the bucket, the URI's endpoint_override and the credentials in the environment "
                   "(AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY or AWS_PROFILE; GOOGLE_APPLICATION_CREDENTIALS for gs://, "
                   "or gs://anonymous@bucket/... for a public bucket or an emulator)")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:180] if str(e).strip() else ""


def sources_of(locations: list[str]) -> dict[str, str]:
    """{folder name: location} of the data sets' folders in stores: what the reading tasks need to open them."""
    return {redacted(loc).rstrip("/"): loc for loc in locations}


@functools.lru_cache(maxsize=16)
def _folder(location: str, retry_limit_s: float | None) -> DataFolder:
    # One client per store and process: a client's start costs more than a read. Keyed by the bound its client was
    # made with too, so one the driver's checks made (stores_retried_for) is not reused after them.
    return DataFolder(location)


def folder_of(path: str, sources: dict[str, str] | None) -> DataFolder | None:
    """The store folder `path` (an object's name) lies in, or None for a local file."""
    for name, location in (sources or {}).items():
        if path.startswith(name + "/"):
            return _folder(location, retry_limit())
    return None
