"""CLIP score: equal to an independent computation through transformers' CLIPModel forward on the tiny CLIP (built
offline, reproducibly); the tiny one is the default with a tiny pipeline; a hub CLIP that is not in the local cache
stops the job before Ray starts, naming the key and the `hf download` that fixes it."""

import numpy as np
import pytest
import torch
from PIL import Image

from raytune_sd3.config import ConfigError, load_job
from raytune_sd3.driver.preflight import check_paths
from raytune_sd3.models.loading import validation_model_name
from raytune_sd3.testmodels.resolve import resolve_validation_model
from raytune_sd3.testmodels.tiny_validation import build_tiny_clip
from raytune_sd3.train.clip_score import ClipScorer

PROMPTS = ["a red circle on a white background", "a blue square", "a photo of a small green cat",
           "pixel art of a big yellow star on a black background, high quality", "a", "word " * 100]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    solid = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    noise = [Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)) for _ in range(n - len(solid))]
    return (solid + noise)[:n]


@pytest.fixture(scope="module")
def flipped_clip_dir(clip_dir, tmp_path_factory):
    """The tiny CLIP with its text projection negated: every cosine changes sign, so the clamp decides the score."""
    import shutil

    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("flipped") / "clip"
    shutil.copytree(clip_dir, folder)
    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("flipped", [False, True], ids=["tiny", "flipped"])
def test_scores_equal_transformers_clipmodel_forward(clip_dir, flipped_clip_dir, flipped):
    from transformers import AutoProcessor, CLIPModel

    folder = flipped_clip_dir if flipped else clip_dir
    images = _images(len(PROMPTS))
    ours = ClipScorer(folder).score(images, PROMPTS)

    # the reference: CLIPModel's own forward (its normalised embeddings, logits = logit_scale * cosine) on the
    # processor's joint call
    model = CLIPModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=PROMPTS, images=images, return_tensors="pt", padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        out = model(**inputs)
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    ref = (100 * cosine.clamp(min=0)).tolist()
    assert ours == pytest.approx(ref, abs=1e-4)
    if flipped:  # negative cosines score 0
        assert (cosine < 0).all() and ours == [0.0] * len(PROMPTS)
    else:  # the tiny CLIP scores in the tens, and the score depends on the pair
        assert all(10 < s < 100 for s in ours) and len({round(s, 3) for s in ours}) == len(ours)


def test_score_folder_averages_each_prompt_over_its_sizes(clip_dir, tmp_path):
    images = _images(4)
    names = ["00_64x64.png", "00_96x64.png", "01_64x64.png", "01_96x64.png"]
    for im, name in zip(images, names, strict=True):
        im.save(tmp_path / name)
    (tmp_path / "notes.png").write_bytes(b"")  # not a validation image: ignored
    scorer = ClipScorer(clip_dir)
    pairs = scorer.score(images, [PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[2]])
    assert scorer.score_folder(tmp_path, [PROMPTS[0], PROMPTS[2]]) == pytest.approx(
        {0: (pairs[0] + pairs[1]) / 2, 1: (pairs[2] + pairs[3]) / 2})


def test_tiny_clip_is_reproducible(clip_dir, tmp_path):
    again = build_tiny_clip(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (again / name).read_bytes() == (clip_dir / name).read_bytes(), name


def _job(tmp_path, **validation):
    return load_job(raw={"output_dir": str(tmp_path / "out"),
                         "data": {"datasets": [{"id": "d", "type": "demo", "instance_data_dir": str(tmp_path / "d")}]},
                         "validation": {"prompts": ["a red circle"], **validation}})


def test_the_default_clip_model_follows_the_pipeline(tmp_path):
    assert validation_model_name(_job(tmp_path), "clip_model") is None  # clip_score off
    tiny = _job(tmp_path, clip_score=True)
    assert validation_model_name(tiny, "clip_model") == "tiny-clip"
    folder = resolve_validation_model(tiny, "clip_model")  # built on first use, under RAYTUNE_SD3_HOME
    assert (ClipScorer(folder).model.config.vision_config.image_size) == 32
    real = tiny.model_copy(update={"model": tiny.model.model_copy(update={"pretrained": "owner/sd3"})})
    assert validation_model_name(real, "clip_model") == "openai/clip-vit-large-patch14"
    assert validation_model_name(_job(tmp_path, clip_score=True, clip_model=str(tmp_path)), "clip_model") == str(
        tmp_path)


def test_a_clip_model_not_in_the_local_cache_stops_the_job_before_ray(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    cfg = _job(tmp_path, clip_score=True, clip_model="openai/clip-vit-large-patch14")
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    msg = str(e.value)
    assert "validation.clip_model: openai/clip-vit-large-patch14" in msg
    assert "`hf download openai/clip-vit-large-patch14`" in msg and "validation.clip_score" in msg
    check_paths(_job(tmp_path, clip_score=False, clip_model="openai/clip-vit-large-patch14"))  # off: not needed
