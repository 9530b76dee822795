"""What a warm start need not read again: a stat-keyed index of image hashes, and the sizes of entries found whole.

A warm run used to open and hash every image (and read every entry's header) to confirm the cache; at a million
images that is most of an hour before the first step. The index, kept beside the cache, lets it stat instead:
    index/images.parquet   path, size, mtime_ns -> sha256 of the bytes, width and height as displayed
    index/entries.parquet  kind/key -> the length of an entry that was checked whole (header and length agree)
An image whose (size, mtime_ns) still match its record reuses the record's hash; any other (touched, rewritten,
new) is opened and hashed again, so a changed image gets a new cache key. An entry whose listed length still
equals the recorded one is whole without opening it; a truncated one has another length and is checked again.

Racy files (git's "racily clean" problem): a file rewritten within the filesystem's timestamp tick of being hashed
could keep its size and mtime. A record is therefore kept only for a file whose mtime was at least RACY_NS older
than the moment it was stat'ed; a younger one is hashed again next run.

Two runs may share a cache: `save` merges the index on storage with this run's records and writes it whole
(CacheFiles.write). A record is a fact about a file's bytes whoever wrote it, so a lost update costs a re-hash,
never a wrong key. An index that is unreadable or of another INDEX_FORMAT is ignored (and rewritten by `save`).
Deleting `index/` is always safe.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from raytune_sd3.data.files import CacheFiles

log = logging.getLogger(__name__)

INDEX_FORMAT = 1  # bump when a record's meaning changes: an index of another format is ignored
RACY_NS = 2_000_000_000  # the coarsest common mtime tick (FAT, some network filesystems) is 2 s
IMAGES, ENTRIES = "index/images.parquet", "index/entries.parquet"


@dataclass(frozen=True)
class ImageFacts:
    """What the cache needs from an image file's bytes, and the stat it was read under."""

    sha256: str
    width: int
    height: int
    size: int
    mtime_ns: int

    def recordable(self, stat_time_ns: int) -> bool:
        return stat_time_ns - self.mtime_ns >= RACY_NS


_IMAGE_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                           ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32())])
_ENTRY_SCHEMA = pa.schema([("entry", pa.string()), ("size", pa.int64())])


class StatIndex:
    """The index of one cache location, in memory; `save` writes it back. Counts what was looked up, so a caller
    (and a test) can tell a warm start that trusted the index from one that read every file."""

    def __init__(self, files: CacheFiles):
        self.files = files
        self.images: dict[str, ImageFacts] = {}
        self.entries: dict[str, int] = {}
        self.hits = self.misses = 0
        self._changed = False

    @classmethod
    def load(cls, files: CacheFiles) -> StatIndex:
        index = cls(files)
        images, entries = index._read(IMAGES), index._read(ENTRIES)
        if images is not None:
            c = images.to_pydict()
            index.images = {p: ImageFacts(s, w, h, n, m) for p, n, m, s, w, h in
                            zip(c["path"], c["size"], c["mtime_ns"], c["sha256"], c["width"], c["height"], strict=True)}
        if entries is not None:
            index.entries = dict(zip(entries["entry"].to_pylist(), entries["size"].to_pylist(), strict=True))
        return index

    def _read(self, name: str) -> pa.Table | None:
        path = self.files.join(name)
        try:
            if self.files.size(path) is None:
                return None
            table = pq.read_table(io.BytesIO(self.files.read(path)))
            meta = table.schema.metadata or {}
            if meta.get(b"format") != str(INDEX_FORMAT).encode():
                log.info("cache index %s is of another format (%s): ignored, rebuilt", name, meta.get(b"format"))
                return None
            return table
        except Exception as e:  # noqa: BLE001 - a corrupt index costs a re-hash, never the run
            log.warning("cache index %s is unreadable (%s: %s): ignored, rebuilt by this run", name,
                        type(e).__name__, e)
            return None

    def image(self, path: str, size: int, mtime_ns: int) -> ImageFacts | None:
        """The record of the file at `path` if its stat still matches it, else None (read the file)."""
        facts = self.images.get(path)
        if facts is not None and facts.size == size and facts.mtime_ns == mtime_ns:
            self.hits += 1
            return facts
        self.misses += 1
        return None

    def add_image(self, path: str, facts: ImageFacts, stat_time_ns: int) -> None:
        if facts.recordable(stat_time_ns) and self.images.get(path) != facts:
            self.images[path] = facts
            self._changed = True

    def entry_size(self, kind: str, key: str) -> int | None:
        """The length the entry had when it was last found whole, or None."""
        return self.entries.get(f"{kind}/{key}")

    def add_entry(self, kind: str, key: str, size: int) -> None:
        if self.entries.get(f"{kind}/{key}") != size:
            self.entries[f"{kind}/{key}"] = size
            self._changed = True

    def save(self) -> None:
        """Merge with what another run may have saved meanwhile (this run's records win) and write both tables
        whole. Nothing is written when this run learnt nothing new."""
        if not self._changed:
            return
        on_disk = StatIndex.load(self.files)
        images = {**on_disk.images, **self.images}
        entries = {**on_disk.entries, **self.entries}
        paths = sorted(images)
        self._write(IMAGES, pa.table({
            "path": paths, "size": [images[p].size for p in paths], "mtime_ns": [images[p].mtime_ns for p in paths],
            "sha256": [images[p].sha256 for p in paths], "width": [images[p].width for p in paths],
            "height": [images[p].height for p in paths]}, schema=_IMAGE_SCHEMA))
        names = sorted(entries)
        self._write(ENTRIES, pa.table({"entry": names, "size": [entries[n] for n in names]}, schema=_ENTRY_SCHEMA))
        self._changed = False

    def _write(self, name: str, table: pa.Table) -> None:
        sink = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({"format": str(INDEX_FORMAT)}), sink)
        self.files.write(self.files.join(name), sink.getvalue())
