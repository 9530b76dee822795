"""The manifest: what the caching stage found usable, one row per image and size, for every worker to train on.

`<output_dir>/manifest.parquet` holds a column per field (the row's image path, caption, data set, sizing, mask,
latent key, bucket width and height, regularisation flag, repeats, first caption's text key and every caption's
text keys) and, in the file's metadata, the cache location, the unconditional text key and the validation prompts'
keys. A worker reads only the columns it trains with (READER_COLUMNS) and makes a row's dict when it needs that row
(`Rows`); the whole-set work (eval split, buckets) runs on columns. A JSON manifest at ~600 bytes a row, which every
worker parsed whole into dicts, was about 600 MB per worker at a million images.

A manifest.json of an earlier version is still read (`read_manifest`); `prepare_data` writes the parquet one and
removes the JSON beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raytune_sd3 import atomic

MANIFEST_FORMAT = "1"
READER_COLUMNS = ("latent_key", "text_key", "text_keys", "width", "height", "repeats", "regularisation",
                  "dataset_id", "flip_key")
SCHEMA = pa.schema([("path", pa.string()), ("caption", pa.string()), ("dataset_id", pa.string()),
                    ("sizing", pa.string()), ("mask_path", pa.string()), ("latent_key", pa.string()),
                    ("width", pa.int32()), ("height", pa.int32()), ("regularisation", pa.bool_()),
                    ("repeats", pa.int32()), ("text_key", pa.string()), ("text_keys", pa.list_(pa.string())),
                    ("flip_key", pa.string())])


class Rows(Sequence):
    """Manifest rows on a pyarrow Table: `rows[i]` is a dict made when asked for (null fields left out, so
    `row.get(name, default)` reads as it did on JSON rows); `column` gives a whole field as numpy."""

    def __init__(self, table: pa.Table):
        self.table = table.combine_chunks()

    @classmethod
    def of(cls, rows: Rows | Sequence[dict]) -> Rows:
        """`rows` as Rows: a list of dicts (the caching stage's, a test's) becomes a table once."""
        if isinstance(rows, Rows):
            return rows
        return cls(pa.Table.from_pylist(list(rows)) if rows else pa.table({}))

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        if isinstance(i, slice):
            return Rows(self.table.slice(*_slice(i, len(self))))
        row = {}
        for name, column in zip(self.table.column_names, self.table.columns, strict=True):
            value = column[i].as_py()
            if value is not None:
                row[name] = value
        return row

    def __iter__(self) -> Iterator[dict]:
        for batch in self.table.to_batches():
            for row in batch.to_pylist():
                yield {k: v for k, v in row.items() if v is not None}

    def column(self, name: str, default=None) -> np.ndarray:
        """The field `name` of every row; `default` where the field is absent or null."""
        if name not in self.table.column_names:
            return np.full(len(self), default, dtype=object if isinstance(default, str) else None)
        column = self.table[name]
        if default is not None and column.null_count:
            column = pc.fill_null(column, default)
        return column.to_numpy(zero_copy_only=False)

    def take(self, indices: np.ndarray | list[int]) -> Rows:
        return Rows(self.table.take(pa.array(np.asarray(indices, dtype=np.int64))))


def _slice(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError("manifest rows slice with step 1 only")
    return start, max(0, stop - start)


def write_manifest(path: Path, rows: Rows | Sequence[dict], uncond_key: str, validation: list[dict],
                   cache_dir: str) -> None:
    """Write the manifest whole (temp file, then rename), typed as SCHEMA when its rows have those fields."""
    table = Rows.of(rows).table
    if not table.num_columns:
        table = SCHEMA.empty_table()
    elif set(table.column_names) == set(SCHEMA.names):
        table = table.select(SCHEMA.names).cast(SCHEMA)
    meta = {"cache_dir": cache_dir, "uncond_key": uncond_key, "validation": validation}
    table = table.replace_schema_metadata({"format": MANIFEST_FORMAT, "raytune_sd3": json.dumps(meta)})
    atomic.write_file(path, lambda tmp: pq.write_table(table, tmp))


def read_manifest(path: Path | str, columns: Sequence[str] | None = None) -> dict:
    """{"cache_dir", "uncond_key", "validation", "rows": Rows}; `columns` limits what is read (the reader's
    READER_COLUMNS). A manifest.json of an earlier version is read whole."""
    path = Path(path)
    if path.suffix == ".json":
        legacy = json.loads(path.read_text())
        return {**legacy, "rows": Rows.of(legacy["rows"])}
    schema = pq.read_schema(path)
    # a column the file lacks is left out (flip_key: manifests written before data.random_flip have none)
    table = pq.read_table(path, columns=[c for c in columns if c in schema.names] if columns else None,
                          memory_map=True)
    meta = schema.metadata or {}
    if meta.get(b"format") != MANIFEST_FORMAT.encode():
        raise ValueError(f"{path} is a manifest of another version ({meta.get(b'format')}); run the caching stage "
                         "again (python -m raytune_sd3.cache JOB.yaml) to rewrite it")
    return {**json.loads(meta[b"raytune_sd3"]), "rows": Rows(table)}


def split_eval(rows: Rows | Sequence[dict], eval_samples: int) -> tuple[Rows, Rows]:
    """(train, eval): the eval rows are the first `eval_samples` by content key, stable across runs and machines;
    the train rows keep the manifest's order."""
    rows = Rows.of(rows)
    if not len(rows):
        return rows, rows
    keys = rows.table["latent_key"]
    eval_index = pc.sort_indices(keys).to_numpy()[:eval_samples]  # (a key's duplicates: all held out together)
    held = pc.is_in(keys, value_set=pc.unique(pc.take(keys, pa.array(eval_index, type=pa.int64()))))
    train_index = np.flatnonzero(~held.to_numpy(zero_copy_only=False))
    return rows.take(train_index), rows.take(eval_index)
