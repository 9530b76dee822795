"""A cache behind an s3:// URI, against a real S3 protocol server (moto, in its own process): entries written
whole by the Ray Data actors from images read out of a bucket, checked, reused and read back, and the URI's options
kept out of messages."""

import io
import socket
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raytune_sd3.config import DatasetConfig, load_job
from raytune_sd3.data.demo import make_demo_dataset
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.files import is_uri, redacted
from raytune_sd3.data.reader import CachedBatches
from raytune_sd3.data.store import CacheStore

pytest.importorskip("moto")

@pytest.fixture(scope="module")
def s3_uri(s3_endpoint):
    """A fresh bucket on the moto S3 server (conftest); the URI of a cache folder in it."""
    s3_endpoint.fs.create_dir("cache-bucket")
    return f"s3://cache-bucket/sd3-cache?{s3_endpoint.query}"


def test_entries_are_written_whole_checked_and_listed(s3_uri):
    store = CacheStore(s3_uri)
    entry = {"latents": torch.randn(16, 4, 4), "mask": torch.ones(1, 4, 4)}
    assert not store.has("latents", "ab" * 16)
    store.write("latents", "ab" * 16, entry)
    assert store.has("latents", "ab" * 16) and store.verify("latents", "ab" * 16) is None
    torch.testing.assert_close(store.read("latents", "ab" * 16), entry)
    assert store.entries() == [("latents", "ab" * 16)]

    data = store.files.read(store.path("latents", "ab" * 16))
    store.files.write(store.path("latents", "cd" * 16), data[:-10])  # a truncated object
    assert not store.has("latents", "cd" * 16) and store.verify("latents", "cd" * 16) == "truncated or unreadable"
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    store.files.write(store.path("latents", "ef" * 16), bytes(flipped))  # whole, but other bytes
    assert store.has("latents", "ef" * 16) and store.verify("latents", "ef" * 16) == "checksum mismatch"

    assert is_uri(s3_uri) and not is_uri("/data/cache") and not is_uri("file:///data/cache")
    assert redacted(s3_uri) == "s3://cache-bucket/sd3-cache"


def test_ray_data_caches_images_from_a_bucket_into_a_bucket_that_training_reads(tiny_sd3, tmp_path, s3_uri,
                                                                               s3_endpoint, fresh_ray, monkeypatch):
    """Images in a bucket and the cache in a bucket: the Ray Data tasks read each image from the store (no node has
    a copy), a warm run reads no image byte (the stat index keys each object by its listed size and mtime) and no
    entry header, and training reads the entries back. The keys are those of the same images on disk, as rows of a
    Parquet file and as members of WebDataset shards in the bucket."""
    import pyarrow.fs as pafs

    from raytune_sd3.data import encode
    from raytune_sd3.data.encode import _keyed, build_cache
    from raytune_sd3.data.index import RACY_NS
    from raytune_sd3.data.manifest import read_manifest
    from raytune_sd3.data.reading import read_file
    from raytune_sd3.data.sources import sources_of
    from raytune_sd3.driver.caching import cache_spec, prepare_data

    uri = s3_uri.replace("/sd3-cache?", "/job-cache?")
    images = s3_uri.replace("/sd3-cache?", "/images?")
    local = make_demo_dataset(tmp_path / "imgs", n_images=6, size=32)
    pafs.copy_files(str(local), "cache-bucket/images", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_endpoint.fs)
    uploaded = time.time()
    cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "model": {"pretrained": tiny_sd3},
                        "text": {"t5_max_length": 77}, "train": {"batch_size": 1, "num_workers": 1},
                        "data": {"cache_dir": uri, "eval_samples": 0, "encode_batch_size": 4, "encode_actors": 2,
                                 "datasets": [{"id": "d", "instance_data_dir": images, "resolution": 32}]}})
    assert (cfg.data.cache_dir, cfg.data.datasets[0].instance_data_dir) == (uri, images)  # URIs, not local paths
    items, _ = discover(cfg.data.datasets[0], alignment=cfg.data.bucket_alignment)
    assert len(items) == 6 and all(it.path.startswith("s3://cache-bucket/images/") for it in items)
    # Objects younger than the index's racy window are read again next run (as fresh local files): let it pass.
    time.sleep(max(0.0, RACY_NS / 1e9 + 0.1 - (time.time() - uploaded)))

    manifest, first = prepare_data(cfg, tiny_sd3)  # what the train command runs before its workers start
    assert (first.latents_encoded, first.latents_reused, first.files_hashed) == (6, 0, 6) and first.texts_encoded
    spec, sources = cache_spec(cfg, tiny_sd3), sources_of([images])
    on_disk, _ = discover(DatasetConfig(id="d", instance_data_dir=local, resolution=32), cfg.data.bucket_alignment)
    local_keys = [r["latent_key"] for r in _keyed([{**it.to_row(), "uid": i} for i, it in enumerate(on_disk)],
                                                  spec, 10**9, {})]
    assert [r["latent_key"] for r in first.rows] == local_keys  # the same bytes: the same cache entries

    reads = []
    monkeypatch.setattr(encode, "read_file", lambda *a: reads.append(a[0]) or read_file(*a))
    second = build_cache(spec, items, ["", *cfg.validation.prompts], batch_size=4, n_actors=2, sources=sources)
    assert (second.latents_encoded, second.texts_encoded, second.latents_reused) == (0, 0, 6)
    assert (second.files_hashed, second.files_from_index, reads) == (0, 6, [])  # no image byte read

    written = read_manifest(manifest)  # as each training worker reads it
    assert written["cache_dir"] == uri and "endpoint_override" not in written["rows"].table["path"][0].as_py()
    reader = CachedBatches(written, written["rows"], seed=0, global_batch=2)
    batch = reader.micro_batch(0, 0, 1, 0, 1, 2)
    assert batch["latents"].shape == (2, 16, 8, 8) and batch["prompt_embeds"].shape[0] == 2  # 64 px buckets
    assert all(v is None for v in (CacheStore(uri).verify(k, key) for k, key in CacheStore(uri).entries()))

    # The same images as rows of a Parquet file in the bucket (type parquet), three of them inverted: the unchanged
    # rows reuse the entries above (an entry's key is its content, wherever it is kept); the Ray tasks read the new
    # ones from the file's row groups and encode them.
    images_bytes = [p.read_bytes() for p in sorted(local.glob("*.png"))]
    for i in range(3):
        mirrored = io.BytesIO()
        Image.eval(Image.open(io.BytesIO(images_bytes[i])), lambda v: 255 - v).save(mirrored, "PNG")  # (a mirror
        # of a centred shape can be the same pixels, hence the same bytes and entry: the key is the content)
        images_bytes[i] = mirrored.getvalue()
    pq.write_table(pa.table({"image": images_bytes, "caption": [f"shape {i}" for i in range(6)]}),
                   "cache-bucket/rows/set.parquet", filesystem=s3_endpoint.fs, row_group_size=2)
    rows_cfg = load_job(raw={**cfg.model_dump(mode="json", exclude={"data"}), "output_dir": str(tmp_path / "rows"),
                             "data": {**cfg.data.model_dump(mode="json", exclude={"datasets"}), "datasets": [
                                 {"id": "p", "type": "parquet", "resolution": 32,
                                  "path": f"s3://cache-bucket/rows/set.parquet?{s3_endpoint.query}"}]}})
    rows_manifest, third = prepare_data(rows_cfg, tiny_sd3)
    assert (third.latents_encoded, third.latents_reused) == (3, 3)
    assert [r["path"] for r in third.rows] == [f"s3://cache-bucket/rows/set.parquet#row={i}" for i in range(6)]
    assert [r["latent_key"] for r in third.rows][3:] == local_keys[3:]
    assert len(CachedBatches(read_manifest(rows_manifest), read_manifest(rows_manifest)["rows"], seed=0,
                             global_batch=2).micro_batch(0, 0, 1, 0, 1, 2)["latents"]) == 2

    # The same bytes again as WebDataset shards in the bucket (type webdataset): every sample reuses an entry above,
    # none is encoded; the tasks read each image by a ranged read of its shard.
    for shard in range(2):
        tar_bytes = io.BytesIO()
        with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
            for i in range(3 * shard, 3 * shard + 3):
                for member, data in ((f"{i:04d}.png", images_bytes[i]), (f"{i:04d}.txt", f"shape {i}".encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with s3_endpoint.fs.open_output_stream(f"cache-bucket/shards/s-{shard}.tar") as f:
            f.write(tar_bytes.getvalue())
    shards_cfg = load_job(raw={**rows_cfg.model_dump(mode="json", exclude={"data"}), "output_dir": str(tmp_path / "wds"),
                               "data": {**cfg.data.model_dump(mode="json", exclude={"datasets"}), "datasets": [
                                   {"id": "w", "type": "webdataset", "resolution": 32,
                                    "urls": f"s3://cache-bucket/shards/s-{{0..1}}.tar?{s3_endpoint.query}"}]}})
    fourth = prepare_data(shards_cfg, tiny_sd3)[1]
    assert (fourth.latents_encoded, fourth.latents_reused) == (0, 6)
    assert [r["latent_key"] for r in fourth.rows] == [r["latent_key"] for r in third.rows]
    assert fourth.rows[4]["path"].startswith("s3://cache-bucket/shards/s-1.tar#member=0004.png&offset=")

    # An object rewritten in place (other bytes, the same length) has another listed mtime: hashed again.
    name = items[0].path.removeprefix("s3://cache-bucket/")
    data = s3_endpoint.fs.open_input_file(f"cache-bucket/{name}").readall()
    time.sleep(1.1)  # S3 times objects to the second
    with s3_endpoint.fs.open_output_stream(f"cache-bucket/{name}") as f:
        f.write(data)
    again, _ = discover(cfg.data.datasets[0], alignment=16)
    assert again[0].stat[0] == items[0].stat[0] and again[0].stat[1] > items[0].stat[1]


def test_the_storage_check_answers_for_reachable_missing_and_silent_stores(s3_uri):
    """The preflight writes a probe object and reads it back; a bucket that is not there says why, and an endpoint
    that accepts connections but never answers is reported as such instead of waited for (a deadline, not a
    timing: the message says which way it ended)."""
    from raytune_sd3.driver.checks import probe_storage

    assert probe_storage(s3_uri) is None
    missing = probe_storage(s3_uri.replace("cache-bucket", "no-such-bucket"))
    assert missing is not None and "no-such-bucket" in missing and missing.startswith("OSError")
    with socket.socket() as silent:  # listens (the kernel completes the handshake) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        answer = probe_storage(f"s3://bucket/cache?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1",
                               timeout_s=2)
        gcs = probe_storage(f"gs://bucket/cache?endpoint_override=127.0.0.1:{port}&scheme=http", timeout_s=2)
    assert answer is not None and answer.startswith("no answer within 2 s")
    # GCS without credentials: its client's retries are bounded, so the reason (or the deadline) comes back
    assert gcs is not None and (gcs.startswith("OSError") or gcs.startswith("no answer within 2 s"))
