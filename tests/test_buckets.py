"""Aspect buckets: bucket sizes, resize and crop on real image files, one bucket per optimizer step, the
too-small-bucket policies, repeats, regularisation weights, masks and multi-resolution through Ray Data, and a
bucketed multi-data-set job trained end to end."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from raytune_sd3.config import DatasetConfig, FlowConfig, load_job
from raytune_sd3.data.buckets import Sizing, plan, size_for_aspect
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.encode import CacheSpec, build_cache
from raytune_sd3.data.pixels import decode, image_problem
from raytune_sd3.data.reader import BucketError, CachedBatches
from raytune_sd3.data.store import CacheStore
from raytune_sd3.flow import flow_loss

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_bucket_sizes_follow_the_resolution_type():
    area = Sizing(1024)  # pixel_area, sides multiples of 64
    assert size_for_aspect(1.0, area) == (1024, 1024)
    assert size_for_aspect(16 / 9, area) == (1344, 768)  # SD3's familiar landscape bucket
    assert size_for_aspect(9 / 16, area) == (768, 1344)
    for aspect in (0.3, 0.5, 0.75, 1.33, 2.0, 3.5):
        w, h = size_for_aspect(aspect, area)
        assert w % 64 == 0 and h % 64 == 0
        assert abs(w * h / 1024**2 - 1) < 0.12, (aspect, w, h)
    pixel = Sizing(1024, "pixel")
    assert size_for_aspect(1.5, pixel) == (1536, 1024) and size_for_aspect(0.5, pixel) == (1024, 2048)
    assert size_for_aspect(1.5, Sizing(512, alignment=16)) == (624, 416)


def _split(path: Path, size=(128, 64), exif_orientation: int | None = None) -> Path:
    """Left half red, right half blue."""
    im = Image.new("RGB", size, RED)
    im.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)
    else:
        im.save(path)
    return path


def _colour(px: np.ndarray) -> str:
    r, b = px[..., 0].astype(int), px[..., 2].astype(int)
    return "red" if (r > 200).all() and (b < 60).all() else "blue" if (b > 200).all() and (r < 60).all() else "mixed"


def test_resize_and_crop_of_real_files(tmp_path):
    img = _split(tmp_path / "wide.png")
    base = Sizing(64, alignment=16)
    keep = decode(str(img), base)  # no crop: the whole image, in its own aspect bucket
    assert keep.shape == (48, 96, 3)
    assert _colour(keep[:, :44]) == "red" and _colour(keep[:, 52:]) == "blue"

    square = dataclasses.replace(base, crop=True)
    corner = decode(str(img), dataclasses.replace(square, crop_style="corner"))
    assert corner.shape == (64, 64, 3) and _colour(corner) == "red"  # top-left window at the image's own scale
    centre = decode(str(img), square)
    assert _colour(centre[:, :30]) == "red" and _colour(centre[:, 34:]) == "blue"
    rand = dataclasses.replace(square, crop_style="random")
    boxes = {plan(128, 64, rand, seed).box for seed in range(20)}
    assert len(boxes) > 3 and all(0 <= b[0] <= 64 and b[2] - b[0] == 64 and b[1] == 0 for b in boxes)
    assert plan(128, 64, rand, 5) == plan(128, 64, rand, 5)  # seeded: the same on every run

    closest = dataclasses.replace(square, crop_aspect="closest", crop_aspect_buckets=(1.0, 2.0))
    assert decode(str(img), closest).shape == (48, 96, 3)
    assert decode(str(img), dataclasses.replace(square, crop_aspect="preserve")).shape == (48, 96, 3)

    rotated = _split(tmp_path / "rotated.jpg", size=(64, 128), exif_orientation=6)  # stored tall, shown wide
    assert decode(str(rotated), base).shape == (48, 96, 3)


def test_downsample_before_the_crop_keeps_the_scene(tmp_path):
    im = Image.new("RGB", (512, 256), BLUE)
    im.paste(RED, (0, 0, 64, 64))
    im.save(tmp_path / "big.png")
    crop = Sizing(64, "pixel", crop=True, crop_style="corner", alignment=16)
    assert _colour(decode(str(tmp_path / "big.png"), crop)) == "red"  # a 64 px detail of a 512 px image
    shrunk = decode(str(tmp_path / "big.png"), dataclasses.replace(crop, maximum_image_size=128,
                                                                    target_downsample_size=128))
    assert _colour(shrunk[:28, :28]) == "red" and _colour(shrunk[36:, 36:]) == "blue"  # halved, then cut


def test_minimum_size_in_the_unit_of_the_resolution_type(tmp_path):
    Image.new("RGB", (100, 30)).save(tmp_path / "strip.png")
    area, pixel = Sizing(64, minimum_image_size=48), Sizing(64, "pixel", minimum_image_size=48)
    assert image_problem(str(tmp_path / "strip.png"), area, 10**9) == ""  # sqrt(3000) = 55 >= 48
    assert "shorter side below minimum_image_size 48" in image_problem(str(tmp_path / "strip.png"), pixel, 10**9)


def _fake_cache(tmp_path: Path, sizes: dict[str, tuple[int, int, int]], reg: set[str] = frozenset(),
                repeats: dict[str, int] | None = None) -> tuple[dict, list[dict]]:
    """Real cache entries (random tensors) for rows named `<bucket><i>`, `sizes`: name -> (w, h, count)."""
    store, rows = CacheStore(tmp_path), []
    store.write("text", "u", {"prompt_embeds": torch.zeros(4, 8), "pooled": torch.zeros(8)})
    for name, (w, h, n) in sizes.items():
        for i in range(n):
            key = f"{name}{i:03d}".ljust(32, "0")
            store.write("latents", key, {"latents": torch.full((16, h // 8, w // 8), float(i))})
            rows.append({"latent_key": key, "text_key": "u", "width": w, "height": h, "dataset_id": name,
                         "regularisation": name in reg, "repeats": (repeats or {}).get(name, 0)})
    return {"cache_dir": str(tmp_path), "uncond_key": "u"}, rows


def test_each_step_is_one_bucket_and_an_epoch_sees_each_sample_once(tmp_path):
    manifest, rows = _fake_cache(tmp_path, {"wide": (96, 48, 8), "tall": (48, 96, 4), "square": (64, 64, 8)},
                                 reg={"square"}, repeats={"tall": 1})
    reader = CachedBatches(manifest, rows, seed=1, global_batch=4, prior_loss_weight=0.25)
    assert reader.steps_per_epoch == (8 + 4 * 2 + 8) // 4
    seen = []
    for step in range(reader.steps_per_epoch):
        shapes = set()
        for micro in range(2):  # batch_size 1 x grad_accum 2 x 2 workers = 4
            for rank in range(2):
                b = reader.micro_batch(step, micro, 2, rank, 2, 1)
                shapes.add(tuple(b["latents"].shape[1:]))
                seen.append(int(reader.epoch_batches(0)[step][micro * 2 + rank]))
                square = b["latents"].shape[-1] == 8
                assert b["loss_weight"].tolist() == [0.25 if square else 1.0]  # regularisation samples
        assert len(shapes) == 1  # every micro-batch of a step comes from one bucket
    counts = np.bincount(seen, minlength=len(rows))
    assert counts.tolist() == [1 + r["repeats"] for r in rows]  # each sample once, `repeats` extra times
    again = CachedBatches(manifest, rows, seed=1, global_batch=4)
    assert [b.tolist() for b in again.epoch_batches(3)] == [b.tolist() for b in reader.epoch_batches(3)]
    assert [b.tolist() for b in reader.epoch_batches(0)] != [b.tolist() for b in reader.epoch_batches(1)]
    with pytest.raises(ValueError, match="global batch 4"):
        reader.micro_batch(0, 0, 1, 0, 1, 1)


def test_regularisation_and_masked_samples_weigh_the_loss(tmp_path):
    """The reader's batch, used as the training loop uses it ((flow_loss(..., mask) * loss_weight).mean()), against
    the loss computed in torch from the tensors written to the cache: each sample's masked velocity MSE, times
    train.prior_loss_weight for regularisation samples, averaged over the batch."""
    g = torch.Generator().manual_seed(0)
    store, rows, written = CacheStore(tmp_path), [], {}
    store.write("text", "u", {"prompt_embeds": torch.zeros(4, 8), "pooled": torch.zeros(8)})
    for i in range(4):  # 0, 1 instance images, 2, 3 regularisation; 0 and 2 with a mask
        key = f"img{i}".ljust(32, "0")
        entry = {"latents": torch.randn(16, 4, 4, generator=g)}
        if i % 2 == 0:
            entry["mask"] = torch.rand(1, 4, 4, generator=g)
        store.write("latents", key, entry)
        written[key] = (entry, 0.3 if i >= 2 else 1.0)
        rows.append({"latent_key": key, "text_key": "u", "width": 32, "height": 32, "regularisation": i >= 2})
    reader = CachedBatches({"cache_dir": str(tmp_path), "uncond_key": "u"}, rows, seed=0, global_batch=4,
                           prior_loss_weight=0.3)
    batch = reader.micro_batch(0, 0, 1, 0, 1, 4)
    pred, noise = torch.randn(4, 16, 4, 4, generator=g), torch.randn(4, 16, 4, 4, generator=g)
    sigmas = torch.full((4,), 0.5)
    loss = (flow_loss(FlowConfig(), pred, batch["latents"], noise, sigmas, batch["mask"]) * batch["loss_weight"]).mean()

    expected = []
    for j, index in enumerate(reader.epoch_batches(0)[0]):
        entry, weight = written[rows[int(index)]["latent_key"]]
        err = (pred[j] - (noise[j] - entry["latents"])) ** 2 * entry.get("mask", torch.ones(1, 4, 4))
        expected.append(weight * err.mean())
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_too_small_buckets_error_oversubscribe_or_drop(tmp_path):
    manifest, rows = _fake_cache(tmp_path, {"wide": (96, 48, 8), "odd": (112, 32, 3)})
    with pytest.raises(BucketError) as e:
        CachedBatches(manifest, rows, seed=0, global_batch=4)
    msg = str(e.value)
    assert "bucket 112x32 (data set odd): 3 samples per epoch" in msg and "global batch of 4" in msg
    assert "data.small_buckets" in msg and "96x48" not in msg
    over = CachedBatches(manifest, rows, seed=0, global_batch=4, small_buckets="oversubscribe")
    assert over.steps_per_epoch == 3
    odd = [b for b in over.epoch_batches(0) if rows[int(b[0])]["dataset_id"] == "odd"]
    assert len(odd) == 1 and sorted(set(odd[0].tolist())) == [8, 9, 10]
    dropped = CachedBatches(manifest, rows, seed=0, global_batch=4, small_buckets="drop")
    assert dropped.steps_per_epoch == 2 and all(i < 8 for b in dropped.epoch_batches(0) for i in b.tolist())


def test_ray_data_caches_buckets_masks_and_several_resolutions(tiny_sd3, tmp_path, ray_local):
    from tests.test_cache import _spec

    inst, reg = tmp_path / "inst", tmp_path / "reg"
    inst.mkdir()
    reg.mkdir()
    for i in range(3):
        _split(inst / f"wide{i}.png")
        mask = Image.new("L", (128, 64), 0)
        mask.paste(255, (0, 0, 64, 64))  # learn the left half only
        mask.save(inst / f"wide{i}_mask.png")
    _split(inst / "nomask.png")
    Image.new("RGB", (64, 64), BLUE).save(reg / "sq.png")
    spec: CacheSpec = _spec(tiny_sd3, tmp_path / "cache", t5_max_length=77)
    items, skipped = discover(DatasetConfig(id="inst", instance_data_dir=inst, resolution=[32, 64],
                                            mask_suffix="_mask"), alignment=16)
    assert [s["path"].rsplit("/", 1)[-1] for s in skipped] == ["nomask.png"]
    assert len(items) == 6  # 3 images x 2 resolutions; mask files are not images
    more, _ = discover(DatasetConfig(id="reg", instance_data_dir=reg, resolution=32, is_regularisation_data=True,
                                     repeats=2), alignment=16)
    report = build_cache(spec, items + more, [""], batch_size=2, n_actors=1)
    sizes = sorted({(r["width"], r["height"]) for r in report.rows})
    assert sizes == [(32, 32), (48, 16), (96, 48)]  # 2:1 at 64 px of area -> 96x48, at 32 px -> 48x16 (x16)
    store = CacheStore(spec.cache_dir)
    for r in report.rows:
        entry = store.read("latents", r["latent_key"])
        assert entry["latents"].shape == (16, r["height"] // 8, r["width"] // 8)
        if r["dataset_id"] == "inst":
            w = r["width"] // 8
            assert entry["mask"].shape == (1, r["height"] // 8, w)
            # left half learnt, right half ignored (resampling blurs the edge a little)
            assert entry["mask"][..., : w // 2].min() > 0.95 and entry["mask"][..., w // 2 + 1:].max() < 0.05
        else:
            assert "mask" not in entry and r["regularisation"] and r["repeats"] == 2
    again = build_cache(spec, items + more, [""], batch_size=2, n_actors=1)
    assert again.latents_encoded == 0 and again.latents_reused == 7


@pytest.mark.slow
def test_bucketed_job_with_masks_and_a_regularisation_set_trains(tmp_path, shared_ray):
    inst, reg = tmp_path / "inst", tmp_path / "reg"
    inst.mkdir()
    reg.mkdir()
    for i in range(8):
        _split(inst / f"w{i}.png", size=(128 + 8 * i, 64))
        (inst / f"w{i}.txt").write_text("a red and blue banner")
        Image.new("L", (128 + 8 * i, 64), 255 if i % 2 else 128).save(inst / f"w{i}_mask.png")
    for i in range(6):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(reg / f"r{i}.png")
    job = yaml.safe_load((ROOT / "jobs" / "tiny.yaml").read_text())
    job["output_dir"] = str(tmp_path / "out")
    job["data"] = {"datasets": [
        {"id": "inst", "instance_data_dir": str(inst), "resolution": 64, "mask_suffix": "_mask"},
        {"id": "reg", "instance_data_dir": str(reg), "resolution": 64, "caption_strategy": "instanceprompt",
         "instance_prompt": "a colour field", "is_regularisation_data": True, "repeats": 1}],
        "bucket_alignment": 16, "eval_samples": 2, "small_buckets": "oversubscribe"}
    job["train"].update(max_steps=6, batch_size=2, checkpoint_every=6, eval_every=None, lr_warmup_steps=0,
                        prior_loss_weight=0.5)
    job["validation"]["prompts"] = ["a red and blue banner"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    r = subprocess.run([sys.executable, "-m", "raytune_sd3.train", str(path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=shared_ray)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = tmp_path / "out"
    report = json.loads((out / "cache_report.json").read_text())
    expected = {"64x64": 6}
    for i in range(8):
        name = "{}x{}".format(*size_for_aspect((128 + 8 * i) / 64, Sizing(64, alignment=16)))
        expected[name] = expected.get(name, 0) + 1
    assert report["buckets"] == expected and len(expected) == 4  # 96x48, 96x32, 112x32 and the square set
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert [s["step"] for s in steps] == list(range(1, 7)) and all(np.isfinite(s["loss"]) for s in steps)
    assert load_job(out / "job.yaml").train.prior_loss_weight == 0.5
    assert (out / "pytorch_lora_weights.safetensors").is_file()
