"""Data sets that are tables: Parquet files (type parquet) and Hugging Face data sets already on this machine (type
huggingface: a `save_to_disk` folder of Arrow files, a folder of Parquet files, or a hub data set in the local HF
cache; never a download), one image per row as encoded bytes.

The driver reads only the small columns (captions, and those `filter` names), never the images: each kept row
becomes an Item named `<file>#row=<n>` (the file by its path, or its URI without query or credentials). The
caching stage's Ray tasks read the image cell of their rows from the file themselves (data/reading.py), a row
group (Parquet) or a memory-mapped file (Arrow) at a time, so the work is sharded by rows and no image passes
through the driver. No `datasets` package is needed: `save_to_disk` writes Arrow IPC streams and a state.json
naming them, which pyarrow reads.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytune_sd3.config import DatasetConfig, is_uri
from raytune_sd3.data.files import filesystem, redacted
from raytune_sd3.data.rowfilter import parse_filter
from raytune_sd3.data.sources import CREDENTIALS_FIX

ROW = "#row="


@dataclass(frozen=True)
class TableFile:
    """One file of a table data set: how it is named, where it is (a path, or a URI with its options), its format
    ("parquet" or "arrow": an Arrow IPC stream, as save_to_disk writes) and the column holding the images."""

    name: str
    location: str
    format: str
    image_column: str


class TableError(ValueError):
    """A table data set that cannot be used (no such file, split or column); the message says what to fix."""


def _fs(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        fs, root, _ = filesystem(location)
        return fs, root.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def _with_path(location: str, fs_path: str, root: str) -> str:
    """The location of `fs_path` (found under `root` of `location`'s filesystem), its query kept."""
    if not is_uri(location):
        return fs_path
    base, _, query = location.partition("?")
    return base.rstrip("/") + fs_path[len(root):] + (f"?{query}" if query else "")


def _files_under(location: str, suffix: str) -> list[str]:
    fs, root = _fs(location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [location]
    if info.type == pafs.FileType.NotFound:
        raise TableError(f"{redacted(location)} does not exist")
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [_with_path(location, p, root) for p in found]


def table_files(ds: DatasetConfig) -> list[TableFile]:
    """The files of a parquet or huggingface data set, in order; TableError when there are none or their store
    cannot be read (naming the key, without the URI's options or credentials)."""
    key, where = ("path", str(ds.path)) if ds.type == "parquet" else ("dataset", str(ds.dataset))
    try:
        return _table_files(ds)
    except OSError as e:
        if not is_uri(where):
            raise
        raise TableError(f"{key}: {redacted(where)} cannot be read; {CREDENTIALS_FIX} ({type(e).__name__}: "
                         f"{str(e).strip()[:180]})") from None


def _table_files(ds: DatasetConfig) -> list[TableFile]:
    if ds.type == "parquet":
        files = [(f, "parquet") for f in _files_under(str(ds.path), ".parquet")]
        where = redacted(str(ds.path))
    else:
        folder = hf_folder(str(ds.dataset))
        files, where = _hf_files(folder, ds.split), f"{ds.dataset} (split {ds.split})"
    if not files:
        raise TableError(f"data set '{ds.id}': no Parquet or Arrow files in {where}")
    return [TableFile(redacted(loc), loc, fmt, ds.image_column) for loc, fmt in files]


def hf_folder(dataset: str) -> str:
    """The local folder of a Hugging Face data set: the folder given, or a hub id's snapshot in the local HF cache
    (never downloaded)."""
    if is_uri(dataset) or Path(dataset).expanduser().is_dir():
        return dataset if is_uri(dataset) else str(Path(dataset).expanduser().resolve())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(dataset, repo_type="dataset", local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not in the cache, or not a hub id: say how to get it
        raise TableError(f"dataset {dataset}: neither a folder nor a hub data set in the local HF cache "
                         f"({type(e).__name__}); download it first: hf download --repo-type dataset {dataset}") from None


def _hf_files(folder: str, split: str) -> list[tuple[str, str]]:
    fs, root = _fs(folder)

    def read_json(name: str) -> dict | None:
        path = f"{root}/{name}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_file(path) as f:
            return json.loads(f.readall())

    splits = read_json("dataset_dict.json")
    if splits is not None:  # a DatasetDict: one save_to_disk folder per split
        if split not in splits.get("splits", []):
            raise TableError(f"dataset {redacted(folder)} has no split {split!r}; it has "
                             f"{', '.join(splits.get('splits', []))}")
        return _hf_files(_with_path(folder, f"{root}/{split}", root), split)
    state = read_json("state.json")
    if state is not None:  # one save_to_disk Dataset
        return [(_with_path(folder, f"{root}/{f['filename']}", root), "arrow") for f in state["_data_files"]]
    files = _files_under(folder, ".parquet")
    chosen = [f for f in files if _split_of(f) == split]
    if not chosen and files:
        found = sorted({_split_of(f) for f in files})
        raise TableError(f"dataset {redacted(folder)} has no split {split!r}; its Parquet files are of "
                         f"{', '.join(found)}")
    return [(f, "parquet") for f in chosen]


def _split_of(location: str) -> str:
    """A hub data set's split from a Parquet file's name or folder: data/train-00000-of-00002.parquet, train/0.parquet."""
    path = PurePosixPath(redacted(location))
    stem = path.stem.split("-")[0]
    return stem if not stem.isdigit() else path.parent.name


def read_schema(table_file: TableFile) -> pa.Schema:
    if table_file.format == "parquet":
        fs, path = _fs(table_file.location)
        return pq.read_schema(path, filesystem=fs)
    return _arrow_table(table_file.location).schema


def read_columns(table_file: TableFile, columns: list[str]) -> pa.Table:
    """The named columns of every row, without the image column (Parquet reads only those; an Arrow stream is
    memory-mapped when local, so the images' pages are not read)."""
    if table_file.format == "parquet":
        fs, path = _fs(table_file.location)
        return pq.read_table(path, filesystem=fs, columns=columns)
    return _arrow_table(table_file.location).select(columns)


def rows_of(ds: DatasetConfig) -> list[tuple[TableFile, np.ndarray, list[list[str]]]]:
    """For each file: the rows kept (after `filter`) and each one's captions. TableError naming a missing column
    or an image column that holds no bytes."""
    expression = parse_filter(ds.filter) if ds.filter else None
    out = []
    for tf in table_files(ds):
        wanted = _check_columns(ds, tf, read_schema(tf), expression.columns if expression else [])
        table = read_columns(tf, sorted(set(wanted)))
        keep = np.arange(table.num_rows)
        if expression is not None:
            keep = np.flatnonzero(expression.mask(table))
        if ds.caption_strategy == "instanceprompt":
            captions = [[ds.instance_prompt or ""]] * len(keep)
        else:
            column = table[ds.caption_column].take(pa.array(keep, type=pa.int64())).to_pylist()
            captions = [_captions(v) for v in column]
        out.append((tf, keep, captions))
    return out


def _check_columns(ds: DatasetConfig, tf: TableFile, schema: pa.Schema, filter_columns: list[str]) -> list[str]:
    """The columns the driver reads (caption, filter's); TableError for a missing one or an image column of no
    bytes."""
    wanted = [c for c in [ds.caption_column if ds.caption_strategy != "instanceprompt" else None,
                          *filter_columns] if c]
    missing = [c for c in [ds.image_column, *wanted] if c not in schema.names]
    if missing:
        raise TableError(f"data set '{ds.id}': {tf.name} has no column {', '.join(missing)}; it has "
                         f"{', '.join(schema.names)} (set image_column / caption_column / filter)")
    image_type = schema.field(ds.image_column).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)):
        raise TableError(f"data set '{ds.id}': {tf.name}: column {ds.image_column} is {image_type}, not encoded "
                         "image bytes (binary, or a Hugging Face Image feature)")
    return wanted


def _captions(value) -> list[str]:
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


# --- worker side: one image cell ---------------------------------------------------------------------------------


def split_row(path: str) -> tuple[str, int] | None:
    """(file name, row) of a table row's name, or None for a file's path."""
    name, sep, row = path.rpartition(ROW)
    return (name, int(row)) if sep and row.isdigit() else None


def read_cell(table_file: TableFile, row: int) -> bytes:
    """The image bytes of `row`: Parquet's row group holding it is read once per process (the next rows of a batch
    are in it), an Arrow file is memory-mapped (local) or read once."""
    if table_file.format == "parquet":
        offsets = _row_groups(table_file.location)
        group = int(np.searchsorted(offsets, row, side="right") - 1)
        cell = _row_group(table_file.location, group, table_file.image_column)[row - int(offsets[group])]
    else:
        cell = _arrow_table(table_file.location)[table_file.image_column][row]
    value = cell.as_py()
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        raise ValueError(f"row {row} of {table_file.name} has no image bytes in {table_file.image_column}")
    return data


@functools.lru_cache(maxsize=8)
def _row_groups(location: str) -> np.ndarray:
    fs, path = _fs(location)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    return np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])[:-1]


@functools.lru_cache(maxsize=2)
def _row_group(location: str, group: int, column: str) -> pa.Array:
    fs, path = _fs(location)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read_row_group(group, columns=[column])[column].combine_chunks()


@functools.lru_cache(maxsize=2)
def _arrow_table(location: str) -> pa.Table:
    if not is_uri(location):
        return pa.ipc.open_stream(pa.memory_map(location)).read_all()
    fs, path = _fs(location)
    with fs.open_input_file(path) as f:
        return pa.ipc.open_stream(f.readall()).read_all()


def table_problem(ds: DatasetConfig) -> str | None:
    """Why a table data set cannot be used, from its file list and its first file's schema (no rows read), or None:
    no such file or split, a missing image, caption or filter column, an image column of no bytes, a bad filter."""
    try:
        files = table_files(ds)
        expression = parse_filter(ds.filter) if ds.filter else None
        schema = read_schema(files[0])
        _check_columns(ds, files[0], schema, expression.columns if expression else [])
    except (TableError, ValueError, OSError) as e:
        return str(e)
    return None


def table_sources(datasets: list[DatasetConfig]) -> dict[str, TableFile]:
    """{file name: TableFile} of the table data sets: what the caching tasks need to read their rows."""
    return {tf.name: tf for ds in datasets if ds.type in ("parquet", "huggingface") for tf in table_files(ds)}
