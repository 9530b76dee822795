"""The stat index (data/index.py): a warm start opens no image, a changed image is hashed and encoded again, a
touched one is hashed but reused, a deleted one drops out, and an index that is corrupt, of another format or
written by a concurrent run is never fatal nor wrong."""

import gc
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from raytune_sd3.config import DatasetConfig
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.encode import build_cache
from raytune_sd3.data.files import CacheFiles
from raytune_sd3.data.index import ENTRIES, IMAGES, RACY_NS, ImageFacts, StatIndex
from raytune_sd3.data.store import CacheStore

HOUR_AGO = time.time() - 3600


def _facts(sha: str = "a" * 64, size: int = 10, mtime_ns: int = 1) -> ImageFacts:
    return ImageFacts(sha, 8, 6, size, mtime_ns)


def test_records_round_trip_and_only_a_matching_stat_hits(tmp_path):
    files = CacheFiles(str(tmp_path))
    index = StatIndex(files)
    now = time.time_ns()
    index.add_image("/d/a.png", _facts(mtime_ns=now - RACY_NS), now)
    index.add_image("/d/racy.png", _facts(mtime_ns=now - 1000), now)  # mtime within the tick: not trusted
    index.add_entry("latents", "k" * 32, 1234)
    index.save()
    again = StatIndex.load(files)
    assert again.images == {"/d/a.png": _facts(mtime_ns=now - RACY_NS)}
    assert again.entry_size("latents", "k" * 32) == 1234 and again.entry_size("text", "k" * 32) is None
    assert again.image("/d/a.png", 10, now - RACY_NS) == _facts(mtime_ns=now - RACY_NS)
    assert again.image("/d/a.png", 10, now - RACY_NS + 1) is None  # touched
    assert again.image("/d/a.png", 11, now - RACY_NS) is None  # rewritten, same mtime
    assert (again.hits, again.misses) == (1, 2)


def test_a_concurrent_runs_records_are_kept(tmp_path):
    files = CacheFiles(str(tmp_path))
    ours, theirs = StatIndex.load(files), StatIndex.load(files)
    ours.add_image("/d/a.png", _facts("a" * 64), time.time_ns())
    theirs.add_image("/d/b.png", _facts("b" * 64), time.time_ns())
    theirs.save()
    ours.save()  # merges what the other run saved meanwhile
    assert set(StatIndex.load(files).images) == {"/d/a.png", "/d/b.png"}


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other format"])
def test_a_bad_index_is_ignored_and_rewritten(tmp_path, caplog, damage):
    files = CacheFiles(str(tmp_path))
    index = StatIndex(files)
    index.add_image("/d/a.png", _facts(), time.time_ns())
    index.add_entry("text", "t" * 32, 99)
    index.save()
    path = tmp_path / IMAGES
    if damage == "garbage":
        path.write_bytes(b"not parquet at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-20])
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata({"format": "0"}), path)
    with caplog.at_level(logging.INFO, logger="raytune_sd3.data.index"):
        loaded = StatIndex.load(files)
    assert loaded.images == {} and loaded.entry_size("text", "t" * 32) == 99  # the good table still counts
    assert "ignored" in caplog.text
    loaded.add_image("/d/b.png", _facts("b" * 64), time.time_ns())
    loaded.save()
    assert set(StatIndex.load(files).images) == {"/d/b.png"}
    assert (tmp_path / ENTRIES).exists()


def _bmp(path, seed: int) -> None:
    """An uncompressed image: any other pixels give a file of the same length."""
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    os.utime(path, (HOUR_AGO, HOUR_AGO))  # older than the racy window, as a data set prepared earlier


@pytest.mark.parametrize("enabled", [True, False])
def test_keying_leaves_the_gc_as_it_found_it(enabled):
    from raytune_sd3.data.encode import _gc_paused

    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.raises(KeyError), _gc_paused():
            assert not gc.isenabled()
            raise KeyError("a failure inside")
        assert gc.isenabled() == enabled
    finally:
        gc.enable()


def test_a_warm_start_opens_no_image_and_sees_every_change(tiny_sd3, tmp_path, ray_local, monkeypatch):
    from tests.test_cache import _spec

    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(6):
        _bmp(data / f"img_{i}.bmp", i)
    ds = DatasetConfig(id="d", instance_data_dir=data, resolution=32)
    spec = _spec(tiny_sd3, tmp_path / "cache", t5_max_length=77)

    def run():
        items, _ = discover(ds, alignment=16)
        return build_cache(spec, items, [""], batch_size=4, n_actors=1)

    cold = run()
    assert (cold.latents_encoded, cold.files_hashed, cold.files_from_index) == (6, 6, 0)
    assert (tmp_path / "cache" / IMAGES).exists() and (tmp_path / "cache" / ENTRIES).exists()

    store = CacheStore(spec.cache_dir)
    reads, whole_size = [], CacheStore.whole_size
    with monkeypatch.context() as m:
        m.setattr(CacheStore, "whole_size", lambda self, kind, key: reads.append(key) or whole_size(self, kind, key))
        warm = run()
    assert (warm.latents_encoded, warm.latents_reused, warm.texts_encoded) == (0, 6, 0)
    assert (warm.files_hashed, warm.files_from_index) == (0, 6)  # no image opened
    assert reads == []  # every entry known whole by its length: no header read either
    assert gc.isenabled()  # keying pauses the cyclic GC (encode._gc_paused), and only while it runs
    assert [r["latent_key"] for r in warm.rows] == [r["latent_key"] for r in cold.rows]

    changed, touched, deleted = data / "img_0.bmp", data / "img_1.bmp", data / "img_2.bmp"
    size = changed.stat().st_size
    _bmp(changed, 100)  # other pixels, the same length
    os.utime(changed, (HOUR_AGO + 5, HOUR_AGO + 5))
    assert changed.stat().st_size == size
    os.utime(touched, (HOUR_AGO + 5, HOUR_AGO + 5))  # same bytes, new mtime
    deleted.unlink()
    after = run()
    assert (after.files_hashed, after.files_from_index) == (2, 3)
    assert (after.latents_encoded, after.latents_reused) == (1, 4)
    keys = {r["path"].rsplit("/", 1)[-1]: r["latent_key"] for r in after.rows}
    before = {r["path"].rsplit("/", 1)[-1]: r["latent_key"] for r in cold.rows}
    assert set(keys) == set(before) - {"img_2.bmp"}  # the deleted image dropped out
    assert keys["img_0.bmp"] != before["img_0.bmp"] and keys["img_1.bmp"] == before["img_1.bmp"]

    (tmp_path / "cache" / IMAGES).write_bytes(b"corrupt")
    rebuilt = run()
    assert (rebuilt.files_hashed, rebuilt.latents_encoded, rebuilt.latents_reused) == (5, 0, 5)

    entry = store.path("latents", keys["img_3.bmp"])  # cut short: its length no longer matches the index's
    entry.write_bytes(entry.read_bytes()[:-16])
    last = run()
    assert last.files_hashed == 0  # the corrupt index was rewritten
    assert (last.latents_encoded, last.latents_reused) == (1, 4)

