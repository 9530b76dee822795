"""Eval loss is deterministic and comparable; validation images are written per prompt and resolution, with SLG."""

import numpy as np
import pytest
import torch
from PIL import Image

from raytune_sd3.config import FlowConfig, LoraConfig, ValidationConfig
from raytune_sd3.models.loading import load_scheduler, load_text_encoders, load_transformer, load_vae
from raytune_sd3.models.lora import add_lora
from raytune_sd3.models.text import encode_prompts
from raytune_sd3.train.validation import eval_loss, sample_images


@pytest.fixture(scope="module")
def embeds(tiny_sd3):
    enc = load_text_encoders(tiny_sd3)
    pe, pooled = encode_prompts(enc, ["a red circle on a white background", "a blue square", ""], 77)
    return [{"prompt_embeds": pe[i], "pooled": pooled[i]} for i in range(3)]


def test_eval_loss_is_deterministic_and_ignores_the_training_shift(tiny_sd3, embeds):
    transformer = load_transformer(tiny_sd3)
    add_lora(transformer, LoraConfig(rank=4))
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 16, 8, 8, generator=g),
             "prompt_embeds": torch.stack([embeds[0]["prompt_embeds"], embeds[1]["prompt_embeds"]]),
             "pooled": torch.stack([embeds[0]["pooled"], embeds[1]["pooled"]])}
    a = eval_loss(transformer, batch, FlowConfig(shift=3.0), "cpu")
    b = eval_loss(transformer, batch, FlowConfig(shift=1.0, weighting="cosmap"), "cpu")
    assert a == b and a > 0  # same sigmas, same noise, whatever the training shift or weighting
    with torch.no_grad():  # a changed LoRA changes it
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    assert eval_loss(transformer, batch, FlowConfig(), "cpu") != a
    fewer = eval_loss(transformer, batch, FlowConfig(eval_sigmas=[0.5]), "cpu")
    assert fewer != eval_loss(transformer, batch, FlowConfig(), "cpu")


def test_validation_images_per_prompt_and_resolution_with_slg(tiny_sd3, tiny_pipe, embeds, tmp_path):
    transformer, vae, sched = load_transformer(tiny_sd3), load_vae(tiny_sd3), load_scheduler(tiny_sd3)
    # 5 steps: SLG runs at steps i with 5*start < i < 5*stop, here 2 and 3 (the defaults 0.01 and 0.2 would give
    # none), so every setting below changes the image
    cfg = ValidationConfig(prompts=["x", "y"], resolution="64x64,96x64", steps=5, guidance=3.0, seed=7,
                           skip_layers=[1], skip_layer_start=0.2, skip_layer_stop=0.8, skip_layer_scale=1.7)
    paths = sample_images(transformer, vae, sched, embeds[:2], embeds[2], cfg, tmp_path / "slg", "cpu")
    assert [p.name for p in paths] == ["00_64x64.png", "00_96x64.png", "01_64x64.png", "01_96x64.png"]
    assert Image.open(paths[1]).size == (96, 64)
    plain = sample_images(transformer, vae, sched, embeds[:2], embeds[2], cfg.model_copy(update={"skip_layers": None}),
                          tmp_path / "plain", "cpu")
    with_slg = torch.tensor(list(Image.open(paths[0]).getdata()), dtype=torch.float32)
    without = torch.tensor(list(Image.open(plain[0]).getdata()), dtype=torch.float32)
    assert (with_slg - without).abs().max() > 0  # skip-layer guidance changes the sample

    # the same images as diffusers' own pipeline called with the same embeddings, seed and SLG arguments
    for path, (prompt, uncond), (w, h) in [(paths[0], embeds[:3:2], (64, 64)), (paths[3], embeds[1:3], (96, 64))]:
        ref = tiny_pipe(prompt_embeds=prompt["prompt_embeds"][None], pooled_prompt_embeds=prompt["pooled"][None],
                        negative_prompt_embeds=uncond["prompt_embeds"][None],
                        negative_pooled_prompt_embeds=uncond["pooled"][None], width=w, height=h,
                        num_inference_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(7),
                        skip_guidance_layers=[1], skip_layer_guidance_scale=1.7, skip_layer_guidance_start=0.2,
                        skip_layer_guidance_stop=0.8).images[0]
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(ref)), path.name
