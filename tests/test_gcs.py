"""Data sets and caches behind gs:// URIs, against a real GCS protocol server (gcp-storage-emulator: Google's JSON
API over HTTP, in its own process; pyarrow's own GCS client talks to it): a folder in a bucket is discovered, read,
sized and counted by `check` as the same folder on disk, each object keyed by the (size, mtime) its listing gives,
cache entries and the stat index written, listed and read back in a bucket, and a bucket that is not there or
credentials that cannot be loaded give one screen before any work. No Ray: the driver's side of the mechanism."""

import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from raytune_sd3.config import ConfigError, DatasetConfig, load_job
from raytune_sd3.data.demo import make_demo_dataset
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.files import CacheFiles, redacted
from raytune_sd3.data.index import ImageFacts, StatIndex
from raytune_sd3.data.reading import read_file
from raytune_sd3.data.sizes import sizes_of
from raytune_sd3.data.sources import DataFolder, sources_of
from raytune_sd3.data.store import CacheStore
from raytune_sd3.driver import preflight
from raytune_sd3.driver.checks import Report, check_data, probe_storage
from raytune_sd3.driver.preflight import check_paths
from tests.silent_store import closed_port, preflight_and_check

pytest.importorskip("gcp_storage_emulator")


class GcsServer:
    """gcp-storage-emulator in memory, in its own process on a free local port. `uri(path)` names bucket/path as a
    job would (anonymous@: the emulator checks no credentials, and pyarrow's URI form has no other way to skip
    them); `fs` is a pyarrow client that may create buckets (a bucket needs a project)."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                                         "--port", str(self.port), "--in-memory", "--quiet"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.05)
        self.query = f"endpoint_override=127.0.0.1:{self.port}&scheme=http"
        self.fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=f"127.0.0.1:{self.port}",
                                     project_id="test-project", retry_time_limit=timedelta(seconds=10))

    def uri(self, path: str) -> str:
        return f"gs://anonymous@{path}?{self.query}"

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def gcs():
    server = GcsServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A data set on disk: captioned squares of two sizes in two sub-folders, and a wide image with no caption at
    the top."""
    root = tmp_path_factory.mktemp("data")
    make_demo_dataset(root / "part0", n_images=3, size=32)
    make_demo_dataset(root / "part1", n_images=2, size=64, seed=1)
    Image.new("RGB", (64, 32), (200, 10, 10)).save(root / "wide.png")
    return root


@pytest.fixture(scope="module")
def bucket(gcs, folder) -> str:
    """The folder's files uploaded object by object, as `gcloud storage cp -r` does: no marker objects for its
    sub-folders (GCS has no folders, only names with slashes)."""
    gcs.fs.create_dir("data-bucket")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with gcs.fs.open_output_stream(f"data-bucket/sets/one/{path.relative_to(folder).as_posix()}") as f:
            f.write(path.read_bytes())
    return gcs.uri("data-bucket/sets/one")


def test_a_folder_in_a_bucket_is_discovered_read_and_counted_as_the_same_folder_on_disk(folder, bucket, tmp_path):
    """Sub-folders without marker objects are found (pyarrow's one-level GCS listing does not report them), each
    object carries the size its listing gave, reads and ranged header reads return the file's bytes and size, and
    `check` counts the images and their buckets from the store."""
    local, _ = discover(DatasetConfig(id="d", instance_data_dir=folder, resolution=32), alignment=16)
    remote, _ = discover(DatasetConfig(id="d", instance_data_dir=bucket, resolution=32), alignment=16)
    name = "gs://data-bucket/sets/one"
    assert [it.path.removeprefix(name) for it in remote] == [it.path.removeprefix(str(folder)) for it in local]
    assert [it.captions for it in remote] == [it.captions for it in local]
    assert len(remote) == 6 and remote[0].captions[0].startswith("a ") and remote[-1].captions == ["wide"]
    assert [it.stat[0] for it in remote] == [os.path.getsize(it.path) for it in local]
    listed = {(i.path, i.size) for i in DataFolder(bucket).listing()}
    assert listed == {(f"data-bucket/sets/one/{p.relative_to(folder).as_posix()}", p.stat().st_size)
                      for p in folder.rglob("*") if p.is_file()}

    sources = sources_of([bucket])
    assert sources == {name: bucket}
    assert read_file(remote[2].path, sources)[0] == Path(local[2].path).read_bytes()
    assert sizes_of([it.path for it in remote], sources) == [(32, 32)] * 3 + [(64, 64)] * 2 + [(64, 32)]

    def checked(where) -> str:
        cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "train": {"batch_size": 1, "num_workers": 1},
                            "data": {"eval_samples": 0, "small_buckets": "drop",
                                     "datasets": [{"id": "d", "instance_data_dir": where, "resolution": 256}]}})
        report = Report()
        assert check_data(cfg, report) == 6
        return next(x for x in report.lines if " d: " in x)

    line, on_disk = checked(bucket), checked(str(folder))
    assert f"d: 6 images in {name}, 2 bucket(s): 256x256 (5), 384x192 (1)" in line and "endpoint_override" not in line
    assert re.search(r"\d+ bucket\(s\).*", line).group() == re.search(r"\d+ bucket\(s\).*", on_disk).group()


def test_an_object_rewritten_with_other_bytes_of_the_same_size_gets_another_key(gcs, bucket, tmp_path):
    """The stat index keys an object by (size, mtime) from its listing: GCS gives an object a new generation, and
    so a new creation time, on every write. The index itself lives in a gs:// cache and is read back from there."""
    ds = DatasetConfig(id="d", instance_data_dir=bucket, resolution=32)
    before = {it.path: it.stat for it in discover(ds, alignment=16)[0]}
    name = "gs://data-bucket/sets/one/part0/00001.png"
    index = StatIndex.load(CacheFiles(gcs.uri("data-bucket/index-cache")))
    index.add_image(name, facts := ImageFacts("ab" * 32, 32, 32, *before[name]), stat_time_ns=before[name][1] + 10**10)
    index.save()

    data = gcs.fs.open_input_file("data-bucket/sets/one/part0/00001.png").readall()
    with gcs.fs.open_output_stream("data-bucket/sets/one/part0/00001.png") as f:
        f.write(bytes(b ^ 0xFF if i == len(data) - 20 else b for i, b in enumerate(data)))
    after = {it.path: it.stat for it in discover(ds, alignment=16)[0]}
    assert after[name][0] == before[name][0] and after[name][1] > before[name][1]
    assert {p: s for p, s in after.items() if p != name} == {p: s for p, s in before.items() if p != name}

    again = StatIndex.load(CacheFiles(gcs.uri("data-bucket/index-cache")))
    assert again.image(name, *before[name]) == facts and again.image(name, *after[name]) is None
    with gcs.fs.open_output_stream("data-bucket/sets/one/part0/00001.png") as f:
        f.write(data)  # the module's data set as it was


def test_cache_entries_are_written_whole_listed_and_read_back_in_a_bucket(gcs):
    gcs.fs.create_dir("cache-bucket")
    uri = gcs.uri("cache-bucket/sd3-cache")
    assert redacted(uri) == "gs://cache-bucket/sd3-cache"
    assert probe_storage(uri) is None  # the preflight's write, read back and delete

    store = CacheStore(uri)
    assert store.files.uploads_whole  # an upload, not a temp object and a server-side copy
    entry = {"latents": torch.randn(16, 4, 4), "mask": torch.ones(1, 4, 4)}
    store.write("latents", "ab" * 16, entry)
    store.write("latents", "cd" * 16, {"latents": torch.zeros(16, 2, 2)})
    assert store.has("latents", "ab" * 16) and store.verify("latents", "ab" * 16) is None
    torch.testing.assert_close(store.read("latents", "ab" * 16), entry)
    assert store.entries() == [("latents", "ab" * 16), ("latents", "cd" * 16)]

    files = CacheFiles(uri)
    files.write(files.join("notes", "a.txt"), b"first")
    files.write(files.join("notes", "a.txt"), b"second, longer")  # replaced whole
    assert files.read(files.join("notes", "a.txt")) == b"second, longer"
    assert files.read_range(files.join("notes", "a.txt"), 8, 6) == b"longer"
    assert [(i.path, i.size) for i in files.listing("notes")] == [("cache-bucket/sd3-cache/notes/a.txt", 14)]
    files.delete(files.join("notes", "a.txt"))
    assert files.size(files.join("notes", "a.txt")) is None and files.listing("notes") == []


def test_a_bucket_that_cannot_be_read_is_one_screen_before_any_work(gcs, bucket, tmp_path, monkeypatch):
    def problems(uri: str) -> str:
        cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
            {"id": "d", "instance_data_dir": uri}]}})
        with pytest.raises(ConfigError) as e:
            check_paths(cfg)
        return str(e.value)

    check_paths(load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
        {"id": "d", "instance_data_dir": bucket}]}}))  # a good one passes
    no_bucket = problems(bucket.replace("data-bucket", "no-such-bucket"))
    assert "data.datasets[0].instance_data_dir: gs://no-such-bucket/sets/one does not exist" in no_bucket
    assert "endpoint_override" not in no_bucket and "Traceback" not in no_bucket
    assert "gs://data-bucket/sets/none does not exist" in problems(bucket.replace("/sets/one?", "/sets/none?"))

    # Without anonymous@ the client loads Google's default credentials: a credentials file that is not there
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    refused = problems(bucket.replace("anonymous@", ""))
    assert "data.datasets[0].instance_data_dir: gs://data-bucket/sets/one cannot be read" in refused
    assert "GOOGLE_APPLICATION_CREDENTIALS" in refused and "gs://anonymous@bucket/" in refused
    assert "endpoint_override=" not in refused and "Traceback" not in refused


def test_check_reports_a_store_that_does_not_answer_instead_of_retrying_it_for_minutes(tmp_path, monkeypatch):
    """`check` lists a data set in a store to count it. GCS's client retries a store that keeps failing (no endpoint
    listening, no credentials found) for minutes unless told otherwise, so the check bounds it (STORE_RETRY_S) and
    reports the data set. A deadline, not a timing: without the bound the check is still waiting at the deadline."""
    monkeypatch.setattr(preflight, "STORE_RETRY_S", 1.0)
    port = closed_port()
    uri = f"gs://anonymous@data-bucket/sets/one?endpoint_override=127.0.0.1:{port}&scheme=http"
    cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "train": {"batch_size": 1, "num_workers": 1},
                        "data": {"eval_samples": 0, "datasets": [{"id": "d", "instance_data_dir": uri}]}})
    refused, check = preflight_and_check(cfg)
    assert "data.datasets[0].instance_data_dir: gs://data-bucket/sets/one" in refused, refused
    assert f"127.0.0.1:{port}" not in refused + check and "Traceback" not in refused
    assert any(x.startswith("[FAIL] data") and " d: " in x and "UNAVAILABLE" in x for x in check.splitlines()), check


def test_a_metadata_file_in_a_store_that_does_not_answer_is_refused_soon(tmp_path, monkeypatch):
    """A local folder whose captions are in a metadata file on gs://: the preflight reads its columns, bounded as
    every open of a data set's store is (STORE_RETRY_S), and names the key. A deadline, not a timing."""
    monkeypatch.setattr(preflight, "STORE_RETRY_S", 1.0)
    port = closed_port()
    make_demo_dataset(tmp_path / "photos", 2, size=32)
    meta = f"gs://anonymous@captions/meta.jsonl?endpoint_override=127.0.0.1:{port}&scheme=http"
    cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
        {"id": "d", "instance_data_dir": str(tmp_path / "photos"), "caption_strategy": "metadata",
         "metadata_file": meta}]}})
    refused, _ = preflight_and_check(cfg)
    assert "data.datasets[0].metadata_file: metadata_file gs://captions/meta.jsonl cannot be read" in refused, refused
    assert len(refused.splitlines()) == 2 and f"127.0.0.1:{port}" not in refused
