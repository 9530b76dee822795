"""Caption sources: a .txt per image (several lines = several captions), the file name, one prompt, a metadata
file (JSONL, CSV, parquet); the reader draws one caption per epoch, the same one again after a resume."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raytune_sd3.config import ConfigError, DatasetConfig, load_job
from raytune_sd3.data.discovery import discover, name_of, stem_of, suffix_of
from raytune_sd3.data.reader import CachedBatches
from raytune_sd3.data.store import CacheStore
from raytune_sd3.driver.preflight import check_paths

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, names: list[str]) -> Path:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (32, 32), "red").save(folder / n)
    return folder


def test_textfile_lines_are_alternative_captions(tmp_path):
    data = _images(tmp_path, ["a.png", "b.png", "c_d-e.png"])
    (data / "a.txt").write_text("a red square\n\n  a crimson block  \n")
    (data / "b.txt").write_text("one caption\n")
    items, skipped = discover(DatasetConfig(id="d", instance_data_dir=data))
    assert skipped == []
    assert [it.captions for it in items] == [["a red square", "a crimson block"], ["one caption"], ["c d-e"]]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_metadata_file_gives_captions_and_lists_what_it_lacks(tmp_path, fmt):
    data = _images(tmp_path / "imgs", ["a.png", "sub/b.png", "c.png"])
    rows = [{"file_name": "a.png", "caption": "first"}, {"file_name": "sub/b.png", "caption": "second"},
            {"file_name": "gone.png", "caption": "a file that is not there"}]
    path = tmp_path / f"meta.{fmt}"
    if fmt == "jsonl":
        rows[0]["caption"] = ["first", "first, again"]  # a list: alternatives
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        path.write_text("file_name,caption\n" + "".join(f"{r['file_name']},\"{r['caption']}\"\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    ds = DatasetConfig(id="d", instance_data_dir=data, caption_strategy="metadata", metadata_file=path)
    items, skipped = discover(ds)
    captions = {Path(it.path).name: it.captions for it in items}
    assert captions["b.png"] == ["second"]
    assert captions["a.png"] == (["first", "first, again"] if fmt == "jsonl" else ["first"])
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert reasons["c.png"] == f"no row for c.png in meta.{fmt}"
    assert reasons["gone.png"].startswith(f"listed in meta.{fmt} but not an image")


@pytest.mark.parametrize("path", ["/data/a_b.png", "s3://bucket/set/part0001/img_0000001.PNG", "a.tar.gz", "a.",
                                  ".png", "..png", "/x/.hidden.jpg", "no_suffix", "s3://b/dir.v2/img", "/x/a b.webp"])
def test_names_are_taken_apart_as_pathlib_does(path):
    """Discovery's string helpers (fast on a million listed names) give what PurePosixPath gives."""
    from pathlib import PurePosixPath

    assert (name_of(path), stem_of(path), suffix_of(path)) == (
        PurePosixPath(path).name, PurePosixPath(path).stem, PurePosixPath(path).suffix)


def test_metadata_mistakes_are_caught_before_ray(tmp_path):
    data = _images(tmp_path / "imgs", ["a.png"])
    bad = tmp_path / "meta.jsonl"
    bad.write_text(json.dumps({"image_path": "a.png", "caption": "x"}) + "\n")
    base = [f"output_dir={tmp_path / 'out'}", "data.datasets.0.type=local",
            f"data.datasets.0.instance_data_dir={data}", "data.datasets.0.caption_strategy=metadata"]
    with pytest.raises(ConfigError, match="needs metadata_file set"):
        load_job(ROOT / "jobs" / "tiny.yaml", base)
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", [*base, f"data.datasets.0.metadata_file={bad}"])
    with pytest.raises(ConfigError, match=r"metadata_file: .*needs a column named one of file_name"):
        check_paths(cfg)
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", [*base, f"data.datasets.0.metadata_file={tmp_path / 'no.csv'}"])
    with pytest.raises(ConfigError, match="no.csv is not a file"):
        check_paths(cfg)


def test_reader_draws_a_caption_per_position_deterministically(tmp_path):
    rows = [{"latent_key": "l", "text_key": "t0", "text_keys": ["t0", "t1", "t2"]}]
    reader = CachedBatches({"cache_dir": str(tmp_path), "uncond_key": "u"}, rows, seed=3)
    drawn = [reader.text_key_at(rows[0], p) for p in range(300)]
    assert drawn == [reader.text_key_at(rows[0], p) for p in range(300)]  # a resumed run draws the same
    counts = np.bincount([int(k[1]) for k in drawn], minlength=3)
    assert counts.min() > 70, counts  # each alternative gets its share
    other = CachedBatches({"cache_dir": str(tmp_path), "uncond_key": "u"}, rows, seed=4)
    assert drawn != [other.text_key_at(rows[0], p) for p in range(300)]
    assert reader.text_key_at({"latent_key": "l", "text_key": "only"}, 5) == "only"  # older manifests


def _dropout_reader(tmp_path: Path, seed: int, uncond: str, rate: float = 0.25) -> CachedBatches:
    """16 images with one caption each (embeddings of ones), and the empty caption's embeddings (twos)."""
    store = CacheStore(tmp_path)
    store.write("text", "cap", {"prompt_embeds": torch.ones(4, 8), "pooled": torch.ones(8)})
    store.write("text", "u", {"prompt_embeds": torch.full((4, 8), 2.0), "pooled": torch.full((8,), 2.0)})
    rows = []
    for i in range(16):
        store.write("latents", f"l{i:02d}".ljust(32, "0"), {"latents": torch.zeros(16, 2, 2)})
        rows.append({"latent_key": f"l{i:02d}".ljust(32, "0"), "text_key": "cap", "width": 16, "height": 16})
    return CachedBatches({"cache_dir": str(tmp_path), "uncond_key": "u"}, rows, seed=seed, caption_dropout=rate,
                         uncond=uncond, global_batch=4, memory_budget=2**20)


def _embeds(reader: CachedBatches, steps: int = 100) -> torch.Tensor:
    """Each sample's prompt embedding (one value: 1 caption, 2 empty caption, 0 zeros) over `steps` steps of
    batch 2 x 2 workers."""
    return torch.stack([reader.micro_batch(s, 0, 1, r, 2, 2)["prompt_embeds"].flatten(1)
                        for s in range(steps) for r in range(2)]).flatten(0, 1)


def test_caption_dropout_draws_the_unconditional_embedding_at_its_rate(tmp_path):
    """data.caption_dropout: that share of samples gets the unconditional embedding, the same positions for the
    same seed (a resumed run drops the same ones); text.uncond zero gives zeros there instead of the empty
    caption's embedding."""
    drawn = _embeds(_dropout_reader(tmp_path, 0, "empty_string"))
    assert set(drawn.unique().tolist()) == {1.0, 2.0} and (drawn == drawn[:, :1]).all()  # whole embeddings
    dropped = drawn[:, 0] == 2.0
    assert abs(dropped.float().mean().item() - 0.25) < 0.07, dropped.float().mean()  # 400 draws: sd 0.022
    assert torch.equal(_embeds(_dropout_reader(tmp_path, 0, "empty_string"))[:, 0] == 2.0, dropped)
    assert not torch.equal(_embeds(_dropout_reader(tmp_path, 1, "empty_string"))[:, 0] == 2.0, dropped)

    zero = _embeds(_dropout_reader(tmp_path, 0, "zero"))
    assert torch.equal(zero[:, 0] == 0.0, dropped) and (zero[~dropped] == 1.0).all()
    assert (_embeds(_dropout_reader(tmp_path, 0, "empty_string", rate=0.0)) == 1.0).all()
