"""Reading one image's bytes wherever its data set keeps it: a local file (by its path), an object in a store
(by its name; data/sources.py), a row of a table (`<file>#row=<n>`; data/tables.py) or a member of a tar shard
(`<shard>#member=...`; data/webdataset.py). `sources` maps a store folder's, a table file's or a shard's name to
where it is ({name: location} for a folder, {name: TableFile} for a table file, {name: ShardFile} for a shard);
the caching stage's tasks get it as an argument, so the options and credentials of a URI never ride in a row."""

from __future__ import annotations

import io
import time

from raytune_sd3.data.sources import folder_of
from raytune_sd3.data.tables import TableFile, read_cell, split_row
from raytune_sd3.data.webdataset import ShardFile, read_member, split_member

Sources = dict[str, "str | TableFile | ShardFile"]


def read_file(path: str, sources: Sources | None = None) -> tuple[bytes, int]:
    """(the bytes, the time just before they were read in ns) of a local file, a store's object or a table's
    image cell."""
    read_at = time.time_ns()
    row = split_row(path)
    if row is not None and isinstance((sources or {}).get(row[0]), TableFile):
        return read_cell(sources[row[0]], row[1]), read_at
    member = split_member(path)
    if member is not None and isinstance((sources or {}).get(member[0]), ShardFile):
        return read_member(sources[member[0]], member[2], member[3]), read_at
    folder = folder_of(path, {k: v for k, v in (sources or {}).items() if isinstance(v, str)})
    if folder is None:
        with open(path, "rb") as f:
            return f.read(), read_at
    return folder.read(path), read_at


def is_local(path: str, sources: Sources | None) -> bool:
    """Whether `path` is a local file (not an object of a store, a row of a table or a member of a shard)."""
    row = split_row(path)
    if row is not None and isinstance((sources or {}).get(row[0]), TableFile):
        return False
    member = split_member(path)
    if member is not None and isinstance((sources or {}).get(member[0]), ShardFile):
        return False
    return folder_of(path, {k: v for k, v in (sources or {}).items() if isinstance(v, str)}) is None


def open_file(path: str, sources: Sources | None = None) -> str | io.BytesIO:
    """What PIL opens: a local path as it is, anything else as its bytes in memory."""
    return path if is_local(path, sources) else io.BytesIO(read_file(path, sources)[0])
