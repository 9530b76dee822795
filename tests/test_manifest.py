"""The columnar manifest (data/manifest.py): the rows a worker reads equal the rows written, a worker reads only
the columns it asks for, the eval split is the one by sorted content key, and an earlier version's JSON still
reads."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raytune_sd3.data.manifest import READER_COLUMNS, Rows, read_manifest, split_eval, write_manifest
from raytune_sd3.data.reader import plan_buckets
from raytune_sd3.run_layout import MANIFEST


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        key = f"{int(rng.integers(0, 16**8)):08x}".ljust(32, "0")
        captions = [f"t{i}", f"t{i}b"] if i % 3 == 0 else [f"t{i}"]
        rows.append({"path": f"/d/{i}.png", "caption": f"caption {i}", "dataset_id": "ab"[i % 2],
                     "sizing": '{"resolution": 64}', "mask_path": f"/d/{i}_mask.png" if i % 4 == 0 else "",
                     "latent_key": key, "width": 64 + 32 * (i % 3), "height": 64, "regularisation": i % 5 == 0,
                     "repeats": i % 2, "text_key": captions[0], "text_keys": captions,
                     "flip_key": f"{i:032x}" if i % 2 else ""})
    rows[7]["latent_key"] = rows[3]["latent_key"]  # the same image in two data sets: one key, twice
    return rows


def test_rows_read_back_equal_and_only_the_asked_columns(tmp_path):
    rows = _rows(50)
    validation = [{"prompt": "a cat", "text_key": "v" * 32}]
    write_manifest(tmp_path / MANIFEST, rows, "u" * 32, validation, "s3://bucket/cache")
    manifest = read_manifest(tmp_path / MANIFEST)
    assert (manifest["cache_dir"], manifest["uncond_key"], manifest["validation"]) == (
        "s3://bucket/cache", "u" * 32, validation)
    assert list(manifest["rows"]) == rows and [manifest["rows"][i] for i in range(50)] == rows
    lazy = read_manifest(tmp_path / MANIFEST, READER_COLUMNS)["rows"]
    assert lazy.table.column_names == list(READER_COLUMNS)
    assert lazy[3] == {k: rows[3][k] for k in READER_COLUMNS}
    # a manifest written before data.random_flip has no flip_key: read without it (the reader flips nothing)
    write_manifest(tmp_path / MANIFEST, [{k: v for k, v in r.items() if k != "flip_key"} for r in rows], "u" * 32,
                   validation, "s3://bucket/cache")
    older = read_manifest(tmp_path / MANIFEST, READER_COLUMNS)["rows"]
    assert older.table.column_names == [c for c in READER_COLUMNS if c != "flip_key"] and "flip_key" not in older[3]


def test_split_eval_holds_out_the_first_keys_in_sorted_order():
    rows = _rows(40)
    train, held = split_eval(rows, 5)
    ordered = sorted(rows, key=lambda r: r["latent_key"])  # a plain stable sort: what the split must equal
    keys = {r["latent_key"] for r in ordered[:5]}
    assert list(held) == ordered[:5]
    assert list(train) == [r for r in rows if r["latent_key"] not in keys]  # manifest order kept
    assert [len(p) for p in split_eval(rows, 0)] == [40, 0]


def test_buckets_from_columns_equal_the_rows_one_by_one():
    rows = _rows(60)
    members, _ = plan_buckets(Rows.of(rows), 2)
    expected: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(rows):
        expected.setdefault((r["width"], r["height"]), []).extend([i] * (1 + r["repeats"]))
    assert [m.tolist() for m in members] == [expected[b] for b in sorted(expected)]


def test_an_earlier_versions_json_manifest_still_reads(tmp_path):
    rows = _rows(8)
    old = tmp_path / "manifest.json"
    old.write_text(json.dumps({"cache_dir": "/c", "uncond_key": "u", "validation": [], "rows": rows}))
    assert list(read_manifest(old)["rows"]) == rows
    write_manifest(tmp_path / MANIFEST, rows, "u", [], "/c")
    table = pq.read_table(tmp_path / MANIFEST)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"format": b"0"}), tmp_path / MANIFEST)
    with pytest.raises(ValueError, match="another version.*raytune_sd3.cache"):
        read_manifest(tmp_path / MANIFEST)


def test_the_file_is_typed_by_its_schema_whatever_the_rows_were_built_from(tmp_path):
    from raytune_sd3.data.manifest import SCHEMA

    write_manifest(tmp_path / MANIFEST, Rows.of(_rows(8)), "u", [], "/c")  # types inferred: int64 sizes
    assert pq.read_schema(tmp_path / MANIFEST).remove_metadata() == SCHEMA
    assert list(read_manifest(tmp_path / MANIFEST)["rows"]) == _rows(8)
