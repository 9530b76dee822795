"""Table data sets (data/tables.py): Parquet files and Hugging Face data sets on this machine (a save_to_disk
folder written as `datasets` writes it: Arrow IPC streams named by state.json; a folder of Parquet files in the
hub's layout; a hub data set in the local HF cache), read without the `datasets` package. The driver reads captions
and filter columns only; each row's image bytes are read from its file where the caching tasks run. Bad input
(a missing column, a column of no bytes, a split that is not there, a filter that is not a comparison) is refused
before any work."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytune_sd3.config import ConfigError, DatasetConfig, load_job
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.reading import read_file
from raytune_sd3.data.tables import ROW, TableError, table_files, table_problem
from raytune_sd3.driver import preflight
from raytune_sd3.driver.preflight import check_paths
from tests.silent_store import closed_port, preflight_and_check

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # a Hugging Face Image feature


def png(i: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), i * 10, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def rows(n: int, hf_image: bool = False) -> pa.Table:
    images = [png(i) for i in range(n)]
    return pa.table({
        "image": pa.array([{"bytes": b, "path": None} for b in images], IMAGE) if hf_image else images,
        "caption": [[f"caption {i}", f"other {i}"] if i == 0 else [] if i == 1 else [f"caption {i}"] for i in range(n)],
        "label": list(range(n)),
    })


def test_parquet_rows_are_items_whose_bytes_are_read_by_row(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(rows(7), folder / "a.parquet", row_group_size=3)  # rows spread over row groups
    pq.write_table(rows(2), folder / "b.parquet")
    ds = DatasetConfig(id="p", type="parquet", path=folder, resolution=32, filter="label != 5")
    items, skipped = discover(ds, alignment=16)
    assert [it.path.rsplit("/", 1)[1] for it in items] == [f"a.parquet{ROW}{r}" for r in (0, 2, 3, 4, 6)] + [
        f"b.parquet{ROW}0"]
    assert items[0].captions == ["caption 0", "other 0"] and items[-1].caption == "caption 0"
    assert [s["path"].rsplit("/", 1)[1] for s in skipped] == [f"a.parquet{ROW}1", f"b.parquet{ROW}1"]
    sources = {tf.name: tf for tf in table_files(ds)}
    for it, expected in zip(items[:5], (0, 2, 3, 4, 6), strict=True):
        assert read_file(it.path, sources)[0] == png(expected)


def test_a_save_to_disk_folder_is_read_without_the_datasets_package(tmp_path):
    """A DatasetDict as save_to_disk writes it: dataset_dict.json naming the splits, and per split a state.json
    naming its Arrow stream files."""
    root = tmp_path / "hf"
    for split, n in (("train", 4), ("test", 2)):
        (root / split).mkdir(parents=True)
        table = rows(n, hf_image=True)
        with pa.OSFile(str(root / split / "data-00000-of-00001.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        (root / split / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    ds = DatasetConfig(id="h", type="huggingface", dataset=str(root), split="test", resolution=32)
    items, skipped = discover(ds, alignment=16)
    assert [it.path for it in items] == [f"{root}/test/data-00000-of-00001.arrow{ROW}0"] and len(skipped) == 1
    sources = {tf.name: tf for tf in table_files(ds)}
    assert read_file(items[0].path, sources)[0] == png(0)
    with pytest.raises(TableError, match="has no split 'validation'; it has train, test"):
        discover(DatasetConfig(id="h", type="huggingface", dataset=str(root), split="validation"))


def test_a_hub_data_set_in_the_local_cache_is_found_and_never_downloaded(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    snapshot = tmp_path / "hub" / "datasets--someone--shapes" / "snapshots" / ("c" * 40)
    (snapshot / "data").mkdir(parents=True)
    pq.write_table(rows(3), snapshot / "data" / "train-00000-of-00001.parquet")
    pq.write_table(rows(2), snapshot / "data" / "test-00000-of-00001.parquet")
    (tmp_path / "hub" / "datasets--someone--shapes" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--someone--shapes" / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    items, _ = discover(DatasetConfig(id="h", type="huggingface", dataset="someone/shapes", resolution=32), 16)
    assert [it.path.rsplit("/", 1)[1] for it in items] == [f"train-00000-of-00001.parquet{ROW}{r}" for r in (0, 2)]
    with pytest.raises(TableError, match="hf download --repo-type dataset someone/other"):
        discover(DatasetConfig(id="h", type="huggingface", dataset="someone/other"))


def test_bad_tables_are_refused_before_any_work(tmp_path):
    pq.write_table(rows(2), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": ["not bytes"], "caption": ["x"]}), tmp_path / "text.parquet")

    def job(**ds) -> str:
        cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
            {"id": "t", "type": "parquet", **ds}]}})
        with pytest.raises(ConfigError) as e:
            check_paths(cfg)
        return str(e.value)

    assert "a.parquet has no column text; it has image, caption, label" in job(path=str(tmp_path / "a.parquet"),
                                                                              caption_column="text")
    assert "column image is string, not encoded image bytes" in job(path=str(tmp_path / "text.parquet"))
    assert "has no column size" in job(path=str(tmp_path / "a.parquet"), filter="size > 3")
    assert "does not exist" in job(path=str(tmp_path / "none.parquet"))
    assert table_problem(DatasetConfig(id="t", type="parquet", path=tmp_path / "a.parquet")) is None
    with pytest.raises(ConfigError, match="filter 'label >' is not an expression"):
        load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
            {"id": "t", "type": "parquet", "path": str(tmp_path / "a.parquet"), "filter": "label >"}]}})
    with pytest.raises(ConfigError, match="remove instance_data_dir"):
        load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
            {"id": "t", "type": "parquet", "path": str(tmp_path), "instance_data_dir": str(tmp_path)}]}})


@pytest.mark.parametrize(("kind", "key"), [("parquet", "path"), ("huggingface", "dataset")])
def test_a_table_in_a_store_that_does_not_answer_is_refused_soon_instead_of_retried_for_minutes(
        tmp_path, monkeypatch, kind, key):
    """GCS's client retries a store that keeps failing (no endpoint listening, no credentials found) for minutes
    unless told otherwise, so the preflight and `check` bound every open of a data set's store (STORE_RETRY_S) and
    say which key. A deadline, not a timing: without the bound both are still waiting at it."""
    monkeypatch.setattr(preflight, "STORE_RETRY_S", 1.0)
    port = closed_port()
    uri = f"gs://anonymous@tables/t?endpoint_override=127.0.0.1:{port}&scheme=http"
    cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "train": {"batch_size": 1, "num_workers": 1},
                        "data": {"eval_samples": 0, "datasets": [{"id": "t", "type": kind, key: uri}]}})
    refused, check = preflight_and_check(cfg)
    assert f"data.datasets[0] (t, type {kind}): {key}: gs://tables/t cannot be read" in refused, refused
    assert f"[FAIL] data     t: {key}: gs://tables/t cannot be read" in check, check
    assert "UNAVAILABLE" in refused and len(refused.splitlines()) <= 3  # the client's reason, in one screen
    assert f"127.0.0.1:{port}" not in refused + check and "anonymous@tables" not in refused + check  # the URI's own
