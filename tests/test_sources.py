"""Data sets in object storage (data/sources.py), against a real S3 protocol server (moto, conftest): a folder in a
bucket is discovered exactly as the same folder on disk (captions from .txt files, file names, a prompt, a metadata
file in the store; masks; sub-folders listed in parallel), and a bucket that is not there, credentials the store
refuses or credentials written in the URI give one screen before any work, with no secret in it or in job.yaml."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from PIL import Image

from raytune_sd3.config import ConfigError, DatasetConfig, dump_job, load_job
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.sources import DataFolder
from raytune_sd3.driver.preflight import check_paths
from tests.conftest import S3Server

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("moto")


def upload(folder: Path, server, uri_path: str) -> None:
    """Copy a local folder's files to bucket/prefix (`uri_path`) on the server."""
    pafs.copy_files(str(folder), uri_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=server.fs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A data set on disk: images in sub-folders, .txt captions (one with two lines, one empty), one image without
    a .txt, masks for all but one image, and a metadata file."""
    root = tmp_path_factory.mktemp("data")
    names = [f"part{p}/img_{i}.png" for p in range(3) for i in range(3)] + ["top_level.png"]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32 + 16 * (i % 2), 32), (i * 20, 0, 0)).save(root / name)
        if name != "part2/img_2.png":
            Image.new("L", (32 + 16 * (i % 2), 32), 255).save(root / name.replace(".png", "_mask.png"))
        if name != "part1/img_2.png":
            (root / name).with_suffix(".txt").write_text(f"caption {i}\nanother {i}\n" if i == 0 else
                                                         "" if i == 4 else f"caption {i}\n")
    (root / "meta.jsonl").write_text("".join(json.dumps({"file_name": n, "caption": f"meta {n}"}) + "\n"
                                             for n in names[:-1]) + json.dumps({"file_name": "gone.png",
                                                                                "caption": "x"}) + "\n")
    return root


@pytest.fixture(scope="module")
def bucket(s3_endpoint, folder):
    s3_endpoint.fs.create_dir("data-bucket")
    upload(folder, s3_endpoint, "data-bucket/sets/one")
    return f"s3://data-bucket/sets/one?{s3_endpoint.query}"


def _relative(items_or_skipped, root: str) -> list:
    """Items (or skipped rows) with the folder's own prefix cut from each path: comparable across local and S3."""
    out = []
    for x in items_or_skipped:
        if isinstance(x, dict):
            out.append({**x, "path": x["path"].removeprefix(root), "reason": x["reason"].replace(root, "ROOT")})
        else:
            out.append((x.path.removeprefix(root), x.captions, x.mask_path.removeprefix(root), x.sizing))
    return out


@pytest.mark.parametrize("settings", [
    {"caption_strategy": "textfile"},
    {"caption_strategy": "filename", "mask_suffix": "_mask"},
    {"caption_strategy": "instanceprompt", "instance_prompt": "a photo", "resolution": [32, 48]},
    {"caption_strategy": "metadata", "metadata_file": "meta.jsonl"},
])
def test_a_folder_in_a_bucket_is_discovered_as_the_same_folder_on_disk(folder, bucket, settings):
    meta = settings.get("metadata_file")
    local = DatasetConfig(id="d", instance_data_dir=folder, **{**settings, **(
        {"metadata_file": folder / meta} if meta else {})})
    remote = DatasetConfig(id="d", instance_data_dir=bucket, **{**settings, **(
        {"metadata_file": bucket.replace("/one?", f"/one/{meta}?")} if meta else {})})
    items, skipped = discover(local, alignment=16)
    in_store, skipped_in_store = discover(remote, alignment=16)
    assert in_store[0].path.startswith("s3://data-bucket/sets/one/")  # named without its query
    assert _relative(in_store, "s3://data-bucket/sets/one") == _relative(items, str(folder))
    assert _relative(skipped_in_store, "s3://data-bucket/sets/one") == _relative(skipped, str(folder))
    assert len(items) >= 8 and all(it.stat is not None and it.stat[0] > 0 for it in in_store)
    assert all(it.stat is None for it in items)  # a local file is stat'ed when needed, not at discovery
    if settings["caption_strategy"] == "textfile":  # the .txt lines, the empty one skipped, no .txt: the name
        captions = {p: c for p, c, _, _ in _relative(in_store, "s3://data-bucket/sets/one")}
        assert captions["/part0/img_0.png"] == ["caption 0", "another 0"]
        assert captions["/part1/img_2.png"] == ["img 2"]
        assert [s["path"] for s in _relative(skipped_in_store, "s3://data-bucket/sets/one")] == ["/part1/img_1.png"]
    if settings.get("mask_suffix"):
        assert [s["path"] for s in _relative(skipped_in_store, "s3://data-bucket/sets/one")] == ["/part2/img_2.png"]
        assert all(it.mask_stat is not None for it in in_store)


def test_the_parallel_listing_finds_what_one_recursive_listing_finds(s3_endpoint, folder, bucket):
    """Sub-folders are listed side by side; the result is the set of objects one recursive listing returns."""
    data = DataFolder(bucket)
    ours = {(i.path, i.size, i.mtime_ns) for i in data.listing()}
    theirs = {(i.path, i.size, i.mtime_ns) for i in s3_endpoint.fs.get_file_info(
        pafs.FileSelector("data-bucket/sets/one", recursive=True)) if i.type == pafs.FileType.File}
    assert ours == theirs and len(ours) == len(list(folder.rglob("*.*")))


def test_a_store_that_cannot_be_read_is_one_screen_before_any_work(s3_endpoint, bucket, tmp_path):
    def problems(uri: str, **ds) -> str:
        cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
            {"id": "d", "instance_data_dir": uri, **ds}]}})
        with pytest.raises(ConfigError) as e:
            check_paths(cfg)
        return str(e.value)

    check_paths(load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
        {"id": "d", "instance_data_dir": bucket}]}}))  # a good one passes
    no_bucket = problems(bucket.replace("data-bucket", "no-such-bucket"))
    assert "instance_data_dir: s3://no-such-bucket/sets/one does not exist" in no_bucket
    no_prefix = problems(bucket.replace("/sets/one?", "/sets/none?"))
    assert "s3://data-bucket/sets/none does not exist" in no_prefix and "endpoint_override" not in no_prefix
    meta = problems(bucket, caption_strategy="metadata", metadata_file=bucket.replace("/one?", "/one/no.jsonl?"))
    assert "metadata_file s3://data-bucket/sets/one/no.jsonl does not exist" in meta


def test_refused_credentials_in_the_uri_are_named_and_never_shown(tmp_path):
    """A store that checks credentials (as a real one does) refuses a key it does not know: the driver says so
    before any work, through the train command (exit 2, one screen, no traceback), and neither that screen nor
    job.yaml holds the key or the secret written in the URI."""
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    server = S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        uri = f"s3://AKIAIOSFODNN7EXAMPLE:{secret}@data-bucket/sets/one?{server.query}"
        cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
            {"id": "d", "instance_data_dir": uri}]}})
        job_yaml = dump_job(cfg)
        assert secret not in job_yaml and "AKIAIOSFODNN7EXAMPLE" not in job_yaml
        r = subprocess.run([sys.executable, "-m", "raytune_sd3.train", "jobs/tiny.yaml", "--set",
                            f"output_dir={tmp_path / 'run'}", "--set", f"data.datasets.0.instance_data_dir={uri}",
                            "--set", "data.datasets.0.type=local"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ})
    finally:
        server.close()
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out and secret not in out and "AKIAIOSFODNN7EXAMPLE" not in out
    assert "instance_data_dir: s3://data-bucket/sets/one cannot be read" in out and "AWS_ACCESS_KEY_ID" in out
    assert not (tmp_path / "run" / "job.yaml").exists() or secret not in (tmp_path / "run" / "job.yaml").read_text()
