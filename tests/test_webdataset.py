"""WebDataset shards (data/webdataset.py), written by the test with tarfile: tiny PNGs with .txt or .json captions,
on disk and on a real S3 protocol server (moto, conftest). A shard's samples are discovered from its tar headers
(brace patterns and folders of shards), each image read by one ranged read; the same image bytes as a file in a
folder and as a tar member get one cache key, and a warm run reads no byte of a shard; bad shards are one screen
before any work; an undecodable member is skipped and reported as a local file is; `check` counts the images and
buckets of shards, tables and store folders from the images' first bytes (or a table's width and height)."""

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytune_sd3.config import ConfigError, DatasetConfig, dump_job, load_job
from raytune_sd3.data import encode
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.encode import CacheSpec, _keyed
from raytune_sd3.data.files import CacheFiles
from raytune_sd3.data.index import RACY_NS, StatIndex
from raytune_sd3.data.reading import read_file
from raytune_sd3.data.webdataset import expand_braces, member_name, shard_sources
from raytune_sd3.driver import preflight
from raytune_sd3.driver.checks import Report, check_data
from raytune_sd3.driver.preflight import check_paths
from tests.silent_store import closed_port, preflight_and_check

ROOT = Path(__file__).resolve().parents[1]


def png(i: int, size: tuple[int, int] = (48, 32)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), i * 10, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def shards(root: Path, n_shards: int = 3, per_shard: int = 3) -> dict[str, bytes]:
    """shard-000.tar ...: sample k has k.png and k.txt (two lines for the first, none for sample 000001); a
    folder beside them holds the same images as files. Returns {sample key: image bytes}."""
    images = {}
    (root / "folder").mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"{s:03d}{i:03d}"
            images[key] = png(s * per_shard + i, (48, 32) if i % 2 else (32, 32))
            members.append((f"{key}.png", images[key]))
            if key != "000001":
                members.append((f"{key}.txt", (f"caption {key}\nanother {key}" if key == "000000"
                                               else f"caption {key}").encode()))
            (root / "folder" / f"{key}.png").write_bytes(images[key])
        write_shard(root / f"shard-{s:03d}.tar", members)
    return images


def spec(cache_dir: Path) -> CacheSpec:
    """A cache's key inputs; no model is loaded to key images."""
    return CacheSpec(pretrained="p", revision=None, cache_dir=str(cache_dir), vae_id="v", text_ids=("t",),
                     vae_shift=0.0, vae_scale=1.0, t5_max_length=77, t5_padding="max_length", dtype="fp32")


def keyed(items, cache_dir: Path, sources=None, index=None) -> list[dict]:
    return _keyed([{**it.to_row(), "uid": i, "stat": list(it.stat or ()), "mask_stat": []}
                   for i, it in enumerate(items)], spec(cache_dir), 10**9, {}, index, sources=sources)


def test_brace_patterns_expand_as_webdataset_names_shards():
    assert expand_braces("s3://b/d-{000..002}.tar") == ["s3://b/d-000.tar", "s3://b/d-001.tar", "s3://b/d-002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shards_are_discovered_from_their_headers_and_each_image_read_by_range(tmp_path):
    images = shards(tmp_path)
    (tmp_path / "json").mkdir()
    write_shard(tmp_path / "json" / "j.tar", [
        ("a/x.webp.json", b"{}"), ("a/x.jpg", images["000000"]),
        ("a/x.json", json.dumps({"caption": ["from json", "second"]}).encode()),
        ("a/y.jpg", images["001000"]), ("a/y.json", b"{\"other\": 1}")])
    ds = DatasetConfig(id="w", type="webdataset", urls=str(tmp_path / "shard-{000..002}.tar"), resolution=[32, 64])
    items, skipped = discover(ds, alignment=16)
    names = [member_name(it.path) for it in items[::2]]  # one Item per resolution
    assert names == [f"{tmp_path}/shard-{k[:3]}.tar#member={k}.png" for k in sorted(images) if k != "000001"]
    assert items[0].captions == ["caption 000000", "another 000000"] and items[2].caption == "caption 000002"
    assert [member_name(s["path"]) for s in skipped] == [f"{tmp_path}/shard-000.tar#member=000001.png"]
    assert "no .txt member" in skipped[0]["reason"]
    sources = shard_sources([ds])
    assert all(read_file(it.path, sources)[0] == images[member_name(it.path)[-10:-4]] for it in items)
    assert all(it.stat[0] == len(images[member_name(it.path)[-10:-4]]) for it in items)

    folder = DatasetConfig(id="w", type="webdataset", urls=str(tmp_path), resolution=32)  # a folder: its .tar files
    assert {member_name(it.path) for it in discover(folder, 16)[0]} == set(names)  # j.tar's samples have no .txt
    as_json = DatasetConfig(id="j", type="webdataset", urls=[str(tmp_path / "json" / "j.tar")], image_key="jpg",
                            caption_key="json:caption", resolution=32)
    items, skipped = discover(as_json, 16)
    assert [(member_name(it.path).rsplit("=", 1)[1], it.captions) for it in items] == [("a/x.jpg", ["from json",
                                                                                                      "second"])]
    assert [s["reason"] for s in skipped] == ["a/y.json has no caption in its field 'caption'"]
    prompt = DatasetConfig(id="p", type="webdataset", urls=str(tmp_path / "shard-000.tar"),
                           caption_strategy="instanceprompt", instance_prompt="a photo", resolution=32)
    assert [it.caption for it in discover(prompt, 16)[0]] == ["a photo"] * 3


def test_a_tar_member_and_a_file_of_the_same_bytes_share_one_cache_key_and_a_warm_run_reads_nothing(
        tmp_path, s3_endpoint, monkeypatch):
    images = shards(tmp_path / "d")
    old = time.time() - 2 * RACY_NS / 1e9  # older than the stat index's racy window: recorded
    for p in (tmp_path / "d").glob("*.tar"):
        os.utime(p, (old, old))
    folder = DatasetConfig(id="f", instance_data_dir=tmp_path / "d" / "folder", caption_strategy="filename",
                           resolution=32)
    local = DatasetConfig(id="w", type="webdataset", urls=str(tmp_path / "d" / "shard-{000..002}.tar"),
                          caption_strategy="instanceprompt", instance_prompt="x", resolution=32)
    s3_endpoint.fs.create_dir("wds-bucket")
    for p in sorted((tmp_path / "d").glob("*.tar")):
        pafs.copy_files(str(p), f"wds-bucket/shards/{p.name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3_endpoint.fs)
    remote = local.model_copy(update={"urls": f"s3://wds-bucket/shards/shard-{{000..002}}.tar?{s3_endpoint.query}"})
    on_disk = discover(folder, 16)[0]
    by_file = {Path(r["path"]).stem: r["latent_key"] for r in keyed(on_disk, tmp_path / "cache")}
    assert len(set(by_file.values())) == len(images)
    for ds in (local, remote):
        items = discover(ds, 16)[0]
        rows = keyed(items, tmp_path / "cache", shard_sources([ds]))
        assert len(rows) == len(images) and not any(r["error"] for r in rows)
        assert {member_name(r["path"])[-10:-4]: r["latent_key"] for r in rows} == by_file
    assert discover(remote, 16)[0][0].path.startswith("s3://wds-bucket/shards/shard-000.tar#member=000000.png")

    items, sources = discover(local, 16)[0], shard_sources([local])
    index = StatIndex.load(CacheFiles(str(tmp_path / "warm")))
    first = keyed(items, tmp_path / "warm", sources, index)
    reads = []
    monkeypatch.setattr(encode, "read_file", lambda *a: reads.append(a[0]) or read_file(*a))
    again = keyed(items, tmp_path / "warm", sources, index)
    assert [r["latent_key"] for r in again] == [r["latent_key"] for r in first] and reads == []  # from the index


def test_an_undecodable_member_is_skipped_and_reported_as_a_local_file_is(tmp_path):
    write_shard(tmp_path / "s.tar", [("a.png", png(1)), ("a.txt", b"fine"), ("b.png", b"not an image at all"),
                                     ("b.txt", b"broken")])
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "b.png").write_bytes(b"not an image at all")
    ds = DatasetConfig(id="w", type="webdataset", urls=str(tmp_path / "s.tar"), resolution=32)
    items = discover(ds, 16)[0]
    rows = keyed(items, tmp_path / "cache", shard_sources([ds]))
    local = keyed(discover(DatasetConfig(id="f", instance_data_dir=tmp_path / "f", resolution=32), 16)[0],
                  tmp_path / "cache")
    assert [bool(r["error"]) for r in rows] == [False, True]
    assert rows[1]["error"].split(":")[0] == local[0]["error"].split(":")[0] == "not a readable image"


def test_bad_shards_are_one_screen_naming_the_key_before_any_work(tmp_path, s3_endpoint):
    shards(tmp_path, n_shards=2)
    (tmp_path / "broken.tar").write_bytes(b"this is no tar archive" * 100)
    write_shard(tmp_path / "noimg.tar", [("a.jpeg2", b"x"), ("a.txt", b"caption")])
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"

    def problems(urls, **ds) -> str:
        cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
            {"id": "w", "type": "webdataset", "urls": urls, **ds}]}})
        with pytest.raises(ConfigError) as e:
            check_paths(cfg)
        return str(e.value)

    check_paths(load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
        {"id": "w", "type": "webdataset", "urls": str(tmp_path / "shard-{000..001}.tar")}]}}))  # good ones pass
    nothing = problems(str(tmp_path / "none-{000..003}.tar"))
    assert f"(w, type webdataset): urls: {tmp_path}/none-{{000..003}}.tar matches no shard" in nothing
    missing = problems(str(tmp_path / "shard-{000..004}.tar"))
    assert "3 of 5 shards not found" in missing and "shard-002.tar" in missing
    assert f"urls: {tmp_path}/broken.tar is not a tar archive" in problems([str(tmp_path / "shard-000.tar"),
                                                                          str(tmp_path / "broken.tar")])
    no_image = problems(str(tmp_path / "noimg.tar"))
    assert "image_key jpg;jpeg;png;webp: no sample in 1 shard(s) has such a member; their members are jpeg2, txt" \
        in no_image
    uri = f"s3://AKIAIOSFODNN7EXAMPLE:{secret}@no-such-bucket/s-{{0..1}}.tar?{s3_endpoint.query}"
    in_store = problems(uri)
    assert "urls: s3://no-such-bucket/s-{0..1}.tar" in in_store and secret not in in_store
    assert "endpoint_override" not in in_store and "AKIAIOSFODNN7EXAMPLE" not in in_store
    cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
        {"id": "w", "type": "webdataset", "urls": [uri], "image_key": "png", "caption_key": "json:text"}]}})
    assert secret not in dump_job(cfg) and "AKIAIOSFODNN7EXAMPLE" not in dump_job(cfg)
    assert "image_key: png" in dump_job(cfg) and "caption_key: json:text" in dump_job(cfg)  # settings, not secrets
    r = subprocess.run([sys.executable, "-m", "raytune_sd3.train", "jobs/tiny.yaml", "--set",
                        f"output_dir={tmp_path / 'run'}", "--set",
                        f"data.datasets=[{{id: w, type: webdataset, urls: '{tmp_path / 'broken.tar'}'}}]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, (r.stdout + r.stderr)[-3000:]
    assert f"urls: {tmp_path}/broken.tar is not a tar archive" in r.stderr + r.stdout  # the train command, before Ray
    with pytest.raises(ConfigError, match="urls are the tar shards of type webdataset"):
        load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"datasets": [
            {"id": "w", "instance_data_dir": str(tmp_path), "urls": "x.tar"}]}})


def test_shards_in_a_store_that_does_not_answer_are_refused_soon_instead_of_retried_for_minutes(tmp_path, monkeypatch):
    """GCS's client retries a store that keeps failing (no endpoint listening, no credentials found) for minutes
    unless told otherwise, so the preflight and `check` bound every open of a data set's store (STORE_RETRY_S) and
    say which key. A deadline, not a timing: without the bound both are still waiting at it."""
    monkeypatch.setattr(preflight, "STORE_RETRY_S", 1.0)
    port = closed_port()
    uri = f"gs://anonymous@shards/s-{{0..1}}.tar?endpoint_override=127.0.0.1:{port}&scheme=http"
    cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "train": {"batch_size": 1, "num_workers": 1},
                        "data": {"eval_samples": 0, "datasets": [{"id": "w", "type": "webdataset", "urls": uri}]}})
    refused, check = preflight_and_check(cfg)
    assert "data.datasets[0] (w, type webdataset): urls: gs://shards/s-{0..1}.tar cannot be read" in refused, refused
    assert "[FAIL] data     w: urls: gs://shards/s-{0..1}.tar cannot be read" in check, check
    assert "UNAVAILABLE" in refused and len(refused.splitlines()) <= 3  # the client's reason, in one screen
    assert f"127.0.0.1:{port}" not in refused + check and "anonymous@shards" not in refused + check  # the URI's own


def test_check_counts_images_and_buckets_of_shards_tables_and_store_folders(tmp_path, s3_endpoint, monkeypatch):
    """The buckets come from each image's first bytes (or a table's width and height columns): the counts equal
    those of the same images in a local folder, which check reads from the files' headers."""
    from raytune_sd3.data import sizes

    images = shards(tmp_path)
    (tmp_path / "folder" / "bad.png").write_bytes(b"broken")
    pq.write_table(pa.table({"image": [images[k] for k in sorted(images)], "caption": ["c"] * len(images),
                             "width": [32 if int(k[-1]) % 2 == 0 else 48 for k in sorted(images)],
                             "height": [32] * len(images)}), tmp_path / "t.parquet")
    s3_endpoint.fs.create_dir("check-bucket")
    pafs.copy_files(str(tmp_path / "folder"), "check-bucket/folder", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_endpoint.fs)
    datasets = [
        {"id": "local", "instance_data_dir": str(tmp_path / "folder"), "caption_strategy": "filename"},
        {"id": "wds", "type": "webdataset", "urls": str(tmp_path / "shard-{000..002}.tar"),
         "caption_strategy": "instanceprompt", "instance_prompt": "x"},
        {"id": "table", "type": "parquet", "path": str(tmp_path / "t.parquet")},
        {"id": "bucket", "instance_data_dir": f"s3://check-bucket/folder?{s3_endpoint.query}",
         "caption_strategy": "filename"}]
    cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "train": {"num_workers": 1, "batch_size": 1},
                        "data": {"eval_samples": 0, "bucket_alignment": 16, "datasets": [{**d, "resolution": 64} for d in datasets]}})
    heads = []
    real = sizes.image_size
    monkeypatch.setattr(sizes, "HEAD_BYTES", 60)  # a PNG's size is in its first 33 bytes; these images are 82+
    monkeypatch.setattr(sizes, "image_size", lambda f: heads.append(len(f.getvalue()) if hasattr(f, "getvalue")
                                                                    else -1) or real(f))
    report = Report()
    check_data(cfg, report)
    lines = "\n".join(report.lines)
    assert "local: 10 images, 2 bucket(s): 64x64 (6), 80x48 (3)" in lines, lines  # the broken file: no bucket
    assert "wds: 9 images in " + str(tmp_path / "shard-{000..002}.tar") + ", 2 bucket(s): 64x64 (6), 80x48 (3)" \
        in lines, lines
    assert f"table: 9 images in {tmp_path / 't.parquet'}, 2 bucket(s): 64x64 (6), 80x48 (3)" in lines, lines
    assert ("bucket: 10 images in s3://check-bucket/folder, 1 unreadable (skipped when caching), 2 bucket(s): "
            "64x64 (6), 80x48 (3)") in lines, lines
    assert not report.problems, report.problems
    # Shards and the bucket by their images' first HEAD_BYTES (the broken object, 6 bytes, is read whole again
    # after its head fails); the table not at all: its width and height columns.
    assert sorted(heads) == [6, 6] + [60] * 18
