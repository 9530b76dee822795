"""The displayed size of many images without reading them whole, wherever they live (what `check` counts buckets
from): a local file's header, the first HEAD_BYTES of an object in a store or of a tar member (one ranged read,
the whole image only when its header lies further in), and a table's `width` and `height` columns where it has them
(a table without them has its image cells read, as nothing else holds their sizes)."""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from raytune_sd3.config import DatasetConfig
from raytune_sd3.data.pixels import image_size
from raytune_sd3.data.reading import Sources, read_file
from raytune_sd3.data.sources import folder_of
from raytune_sd3.data.tables import ROW, read_columns, read_schema, rows_of
from raytune_sd3.data.webdataset import ShardFile, split_member

HEAD_BYTES = 1 << 16  # nearly every image's header (its size, a JPEG's EXIF orientation) is in its first 64 KiB
THREADS = 16  # ranged reads in flight at once; each is a request to a store, so threads wait, not compute
SIZE_COLUMNS = ("width", "height")


def _from_head(head: Callable[[], bytes], whole: Callable[[], bytes]) -> tuple[int, int]:
    """The size from the image's first bytes, or (a header beyond them, e.g. a large EXIF block) from all of them."""
    try:
        return image_size(io.BytesIO(head()))
    except Exception:  # noqa: BLE001 - a header cut short: read the image whole (and fail there if it is bad)
        return image_size(io.BytesIO(whole()))


def size_of(path: str, sources: Sources | None) -> tuple[int, int]:
    """(width, height) as displayed of one image: a local path, a store's object, a table row or a tar member."""
    member = split_member(path)
    shard = (sources or {}).get(member[0]) if member else None
    if isinstance(shard, ShardFile):
        from raytune_sd3.data.webdataset import read_member

        _, _, offset, length = member
        return _from_head(lambda: read_member(shard, offset, min(length, HEAD_BYTES)),
                          lambda: read_member(shard, offset, length))
    folder = folder_of(path, {k: v for k, v in (sources or {}).items() if isinstance(v, str)})
    if folder is not None:
        def head() -> bytes:
            with folder.fs.open_input_file(folder.fs_path(path)) as f:
                return f.read_at(min(HEAD_BYTES, f.size()), 0)

        return _from_head(head, lambda: folder.read(path))
    if ROW in path:
        return image_size(io.BytesIO(read_file(path, sources)[0]))
    return image_size(path)


def sizes_of(paths: list[str], sources: Sources | None = None,
             known: dict[str, tuple[int, int]] | None = None) -> list[tuple[int, int] | None]:
    """Each image's (width, height), None for one that cannot be read (caching would skip it too); `known` sizes
    (a table's columns) are taken as they are. Read THREADS at once."""
    known = known or {}

    def one(path: str) -> tuple[int, int] | None:
        if path in known:
            return known[path]
        try:
            return size_of(path, sources)
        except Exception:  # noqa: BLE001 - the caching stage reports why
            return None

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, paths))


def table_sizes(ds: DatasetConfig) -> dict[str, tuple[int, int]]:
    """{row name: (width, height)} from a table's width and height columns (the metadata many Hugging Face data
    sets carry), for the rows `filter` keeps; {} when its files lack them."""
    out = {}
    for tf, keep, _ in rows_of(ds):
        if not set(SIZE_COLUMNS) <= set(read_schema(tf).names):
            return {}
        table = read_columns(tf, list(SIZE_COLUMNS))
        w, h = (table[c].to_pylist() for c in SIZE_COLUMNS)
        out.update({f"{tf.name}{ROW}{r}": (int(w[r]), int(h[r])) for r in keep
                    if isinstance(w[r], int | float) and isinstance(h[r], int | float) and w[r] > 0 and h[r] > 0})
    return out
