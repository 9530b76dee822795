"""The cache: latents equal the VAE's posterior sample with SD3's shift/scale, keys cover what changes an entry,
and the Ray Data pipeline encodes each item once, skipping bad files."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from raytune_sd3.config import DatasetConfig
from raytune_sd3.data.buckets import Sizing, seed_from_key
from raytune_sd3.data.demo import make_demo_dataset
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.encode import CacheSpec, build_cache, encode_latents, pixels_to_tensor
from raytune_sd3.data.pixels import decode
from raytune_sd3.data.store import CacheStore
from raytune_sd3.models.loading import load_text_encoders, load_vae
from raytune_sd3.models.text import encode_prompts


def _spec(tiny_sd3: str, cache_dir, **changes) -> CacheSpec:
    from raytune_sd3.config import JobConfig
    from raytune_sd3.driver.caching import cache_spec

    cfg = JobConfig.model_validate({"output_dir": str(cache_dir), "data": {
        "cache_dir": str(cache_dir), "datasets": [{"id": "d", "instance_data_dir": str(cache_dir)}]}})
    return dataclasses.replace(cache_spec(cfg, tiny_sd3), **changes)


def test_latents_equal_the_vae_posterior_sample_shifted_and_scaled(tiny_sd3, tmp_path):
    make_demo_dataset(tmp_path / "d", n_images=3, size=64)
    pixels = np.stack([decode(str(p), Sizing.square(64)) for p in sorted((tmp_path / "d").glob("*.png"))])
    keys = ["a" * 32, "b" * 32, "c" * 32]
    vae = load_vae(tiny_sd3)
    ours = encode_latents(vae, pixels_to_tensor(pixels), keys, shift=0.0609, scale=1.5305)
    x = pixels_to_tensor(pixels)
    for i, k in enumerate(keys):
        with torch.no_grad():
            dist = vae.encode(x[i : i + 1]).latent_dist
        ref = (dist.sample(generator=torch.Generator().manual_seed(seed_from_key(k))) - 0.0609) * 1.5305
        single = encode_latents(vae, x[i : i + 1], [k], shift=0.0609, scale=1.5305)
        torch.testing.assert_close(single, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours[i : i + 1], ref, rtol=1e-3, atol=1e-3)  # batched convs sum in another order
        assert not torch.allclose(ours[i], (dist.mean[0] - 0.0609) * 1.5305)  # a sample, not the mean
    assert ours.shape == (3, 16, 8, 8)
    assert vae.config.shift_factor == 0.0609 and vae.config.scaling_factor == 1.5305


def test_every_key_field_changes_the_key(tiny_sd3, tmp_path):
    spec, sizing = _spec(tiny_sd3, tmp_path), Sizing(64)
    base_t, base_l = spec.text_key("a red circle"), spec.latent_key("f" * 64, sizing.to_json())
    assert spec.text_key("a red circle") == base_t and spec.latent_key("f" * 64, Sizing(64).to_json()) == base_l
    for change in [{"t5_max_length": 77}, {"t5_padding": "zero"}, {"text_ids": ("x",) + spec.text_ids[1:]},
                   {"dtype": "bf16"}, {"text_encoder_dtype": "bf16"}]:
        assert _spec(tiny_sd3, tmp_path, **change).text_key("a red circle") != base_t, change
    assert spec.text_key("a red square") != base_t
    for change in [{"vae_id": "other"}, {"vae_scale": 1.0}, {"vae_shift": 0.0}, {"dtype": "bf16"}]:
        assert _spec(tiny_sd3, tmp_path, **change).latent_key("f" * 64, sizing.to_json()) != base_l, change
    for change in [{"resolution": 128}, {"resolution_type": "pixel"}, {"crop": True}, {"crop_style": "random"},
                   {"crop_aspect": "preserve"}, {"crop_aspect_buckets": (1.0, 1.5)}, {"minimum_image_size": 8},
                   {"maximum_image_size": 96, "target_downsample_size": 64}, {"alignment": 16}]:
        assert spec.latent_key("f" * 64, dataclasses.replace(sizing, **change).to_json()) != base_l, change
    assert spec.latent_key("e" * 64, sizing.to_json()) != base_l  # other image bytes
    assert spec.latent_key("f" * 64, sizing.to_json(), mask_sha256="d" * 64) != base_l  # a mask
    assert spec.latent_key("f" * 64, sizing.to_json(), flipped=True) != base_l  # the mirrored image (random_flip)


def test_ray_data_cache_encodes_once_and_skips_bad_files(tiny_sd3, tmp_path, ray_local):
    data = make_demo_dataset(tmp_path / "imgs", n_images=6, size=32)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "empty.jpg").write_bytes(b"")
    Image.new("RGBA", (40, 32), (0, 0, 255, 0)).save(data / "transparent.png")  # composited on white
    (data / "transparent.txt").write_text("a blue square on a white background")
    items, _ = discover(DatasetConfig(id="d", instance_data_dir=data, resolution=32), alignment=16)
    spec = _spec(tiny_sd3, tmp_path / "cache", t5_max_length=77)

    first = build_cache(spec, items, ["", "a validation prompt"], batch_size=4, n_actors=1)
    assert first.latents_encoded == 7 and first.latents_reused == 0
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in first.skipped) == ["broken.png", "empty.jpg"]
    captions = {it.caption for it in items if not it.path.endswith(("broken.png", "empty.jpg"))}
    assert first.texts_encoded == len(captions) + 2  # identical captions encoded once, + "" + validation
    assert len(first.rows) == 7

    store = CacheStore(spec.cache_dir)
    row = next(r for r in first.rows if r["path"].endswith("transparent.png"))
    lat = store.read("latents", row["latent_key"])["latents"]
    assert lat.shape == (16, 4, 4)
    pixels = decode(row["path"], Sizing.square(32))
    assert pixels.min() == 255  # transparent blue on white is white
    text = store.read("text", row["text_key"])
    ref, ref_pooled = encode_prompts(load_text_encoders(tiny_sd3), [row["caption"]], 77)
    torch.testing.assert_close(text["prompt_embeds"], ref[0])
    torch.testing.assert_close(text["pooled"], ref_pooled[0])

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")}
    second = build_cache(spec, items, ["", "a validation prompt"], batch_size=4, n_actors=1)
    assert (second.latents_encoded, second.texts_encoded) == (0, 0)
    assert second.latents_reused == 7 and second.texts_reused == first.texts_encoded
    assert [r["latent_key"] for r in second.rows] == [r["latent_key"] for r in first.rows]
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")}

    changed = dataclasses.replace(spec, t5_max_length=154)  # a changed key field recomputes only what it covers
    third = build_cache(changed, items, [""], batch_size=4, n_actors=1)
    assert third.latents_encoded == 0 and third.texts_encoded == len(captions) + 1


def test_no_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data set 'x': no images"):
        discover(DatasetConfig(id="x", instance_data_dir=tmp_path / "empty"))


def test_random_flip_caches_the_mirrored_crop_under_its_own_key(tiny_sd3, tmp_path, ray_local):
    """data.random_flip: each image also gets an entry of its mirrored pixels (the same random crop, mirrored),
    which is the VAE's sample of the mirrored image seeded by its own key; turning it on encodes only the mirrored
    entries, turning it off again encodes nothing."""
    data = make_demo_dataset(tmp_path / "imgs", n_images=3, size=48)
    items, _ = discover(DatasetConfig(id="d", instance_data_dir=data, resolution=32, crop=True, crop_style="random"),
                        alignment=16)
    spec = _spec(tiny_sd3, tmp_path / "cache", t5_max_length=77)
    plain = build_cache(spec, items, [""], batch_size=4, n_actors=1)
    assert plain.latents_encoded == 3 and all(r["flip_key"] == "" for r in plain.rows)

    flipped = build_cache(spec, items, [""], batch_size=4, n_actors=1, random_flip=True)
    assert (flipped.latents_encoded, flipped.latents_reused, flipped.texts_encoded) == (3, 3, 0)
    assert [r["latent_key"] for r in flipped.rows] == [r["latent_key"] for r in plain.rows]
    assert len({r["flip_key"] for r in flipped.rows} - {r["latent_key"] for r in flipped.rows} - {""}) == 3

    from raytune_sd3.data.pixels import load_image, plan_of

    store, vae = CacheStore(spec.cache_dir), load_vae(tiny_sd3)
    for r in flipped.rows:
        pixels = load_image(r["path"], plan_of({**r, "orig_width": 48, "orig_height": 48}))  # the plain entry's crop
        mirrored = np.ascontiguousarray(pixels[:, ::-1])
        ref = encode_latents(vae, pixels_to_tensor(mirrored[None]), [r["flip_key"]], spec.vae_shift, spec.vae_scale)
        # batched convs sum in another order: ~7e-5 apart; a wrong crop or no mirror is far more (last assert)
        torch.testing.assert_close(store.read("latents", r["flip_key"])["latents"], ref[0], rtol=1e-3, atol=1e-3)
        unflipped = encode_latents(vae, pixels_to_tensor(pixels[None]), [r["latent_key"]], spec.vae_shift,
                                   spec.vae_scale)
        torch.testing.assert_close(store.read("latents", r["latent_key"])["latents"], unflipped[0], rtol=1e-3,
                                   atol=1e-3)
        assert not torch.allclose(ref, unflipped, atol=1e-3)  # the mirror is another image

    again = build_cache(spec, items, [""], batch_size=4, n_actors=1, random_flip=True)
    off = build_cache(spec, items, [""], batch_size=4, n_actors=1)
    assert (again.latents_encoded, again.latents_reused) == (0, 6) and (off.latents_encoded, off.latents_reused) == (0, 3)


def test_a_mirrored_entry_is_drawn_half_the_time_from_the_seed_and_place():
    """The reader takes an image's mirrored entry (data.random_flip) where numpy's generator seeded by
    [train.seed, 13, position] draws below 1/2 (the reference, written out here): the same on a resume."""
    from raytune_sd3.data.reader import CachedBatches

    reader = CachedBatches.__new__(CachedBatches)  # latent_key_at reads only the seed
    reader.seed = 3
    row = {"latent_key": "plain", "flip_key": "mirrored"}
    drawn = [reader.latent_key_at(row, p) for p in range(400)]
    assert drawn == ["mirrored" if np.random.default_rng([3, 13, p]).random() < 0.5 else "plain" for p in range(400)]
    assert 150 < drawn.count("mirrored") < 250
    assert {reader.latent_key_at({"latent_key": "plain", "flip_key": ""}, p) for p in range(50)} == {"plain"}
    assert {reader.latent_key_at({"latent_key": "plain"}, p) for p in range(50)} == {"plain"}  # an older manifest
