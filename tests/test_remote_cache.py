"""A cache behind an s3:// URI, against a real S3 protocol server (moto, in its own process): entries written
whole by the Ray Data actors, checked, reused and read back, and the URI's options kept out of messages."""

import dataclasses
import socket
import subprocess
import sys
import time

import pytest
import torch

from raytune_sd3.config import DatasetConfig, load_job
from raytune_sd3.data.demo import make_demo_dataset
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.files import is_uri, redacted
from raytune_sd3.data.reader import CachedBatches
from raytune_sd3.data.store import CacheStore

pytest.importorskip("moto")

# moto 5 answers CompleteMultipartUpload with a <CompleteMultipartUploadResponse> root where S3 sends
# <CompleteMultipartUploadResult>; the AWS C++ SDK under pyarrow then reads the 200 as an error. The server is
# otherwise real S3 over HTTP, so it runs with that one element renamed.
SERVER = """
import sys
import moto.s3.responses as r
from moto.server import main

plain = r.S3Response.serialized

def serialized(self, result):
    status, headers, body = plain(self, result)
    if self.data.get("Action") == "CompleteMultipartUpload":
        body = body.replace(b"MultipartUploadResponse" if isinstance(body, bytes) else "MultipartUploadResponse",
                            b"MultipartUploadResult" if isinstance(body, bytes) else "MultipartUploadResult")
    return status, headers, body

r.S3Response.serialized = serialized
main(["-p", sys.argv[1]])
"""


@pytest.fixture(scope="module")
def s3_uri():
    """A fresh bucket on a moto S3 server on a free local port; the URI of a cache folder in it."""
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("cache-bucket")
        yield f"s3://cache-bucket/sd3-cache?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.terminate()
        server.wait(10)


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


def test_ray_data_fills_an_s3_cache_that_training_reads(tiny_sd3, tmp_path, s3_uri, ray_local):
    from raytune_sd3.data.encode import build_cache
    from tests.test_cache import _spec

    uri = s3_uri.replace("/sd3-cache?", "/job-cache?")
    cfg = load_job(raw={"output_dir": str(tmp_path / "out"), "data": {"cache_dir": uri, "datasets": [
        {"id": "d", "instance_data_dir": str(tmp_path / "imgs")}]}})
    assert cfg.data.cache_dir == uri  # a URI is not turned into a local path
    data = make_demo_dataset(tmp_path / "imgs", n_images=6, size=32)
    items, _ = discover(DatasetConfig(id="d", instance_data_dir=data, resolution=32), alignment=16)
    spec = dataclasses.replace(_spec(tiny_sd3, tmp_path, t5_max_length=77), cache_dir=uri)
    first = build_cache(spec, items, [""], batch_size=4, n_actors=2)
    assert (first.latents_encoded, first.latents_reused) == (6, 0) and first.texts_encoded > 0
    second = build_cache(spec, items, [""], batch_size=4, n_actors=2)
    assert (second.latents_encoded, second.texts_encoded, second.latents_reused) == (0, 0, 6)

    reader = CachedBatches({"cache_dir": uri, "uncond_key": first.text_keys[""]}, first.rows, seed=0, global_batch=2)
    batch = reader.micro_batch(0, 0, 1, 0, 1, 2)
    assert batch["latents"].shape == (2, 16, 4, 4) and batch["prompt_embeds"].shape[0] == 2
    assert all(v is None for v in (CacheStore(uri).verify(k, key) for k, key in CacheStore(uri).entries()))


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
