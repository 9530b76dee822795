"""Eval loss is deterministic, comparable, batched and shared over ranks; validation images are written per prompt and
resolution, with SLG."""

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from raytune_sd3.config import FlowConfig, LoraConfig, ValidationConfig
from raytune_sd3.models.loading import load_sampler, load_text_encoders, load_transformer, load_vae
from raytune_sd3.models.lora import add_lora
from raytune_sd3.models.text import encode_prompts
from raytune_sd3.train.validation import EVAL_SEED, eval_loss, eval_sums, sample_images
from tests.conftest import run_gloo_ranks
from tests.test_lora import _trained


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


SIGMAS = [0.1, 0.55, 0.9]  # 0.55: a bf16 timestep would be 552, not 550


def _eval_set() -> list[dict[str, torch.Tensor]]:
    """Two buckets (3 items at 8x8, 2 masked items at 8x12), random embeddings of the tiny model's widths."""
    g = torch.Generator().manual_seed(0)

    def bucket(n, h, w):
        return {"latents": torch.randn(n, 16, h, w, generator=g), "prompt_embeds": torch.randn(n, 154, 96, generator=g),
                "pooled": torch.randn(n, 80, generator=g)}

    masked = bucket(2, 8, 12)
    masked["mask"] = (torch.rand(2, 1, 8, 12, generator=g) > 0.5).float()
    return [bucket(3, 8, 8), masked]


def _reference(transformer, batches, autocast=contextlib.nullcontext, dtype=torch.float32) -> float:
    """The eval loss written out: per item (noise seeded by its index) and sigma, one batch-1 forward of the diffusers
    transformer with the timestep sigma * 1000 in fp32, and the mean masked squared error against noise - x0."""
    losses, index = [], 0
    for batch in batches:
        for i in range(batch["latents"].shape[0]):
            x0 = batch["latents"][i:i + 1]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(EVAL_SEED + index))
            index += 1
            mask = batch["mask"][i:i + 1] if "mask" in batch else torch.ones(())
            for s in SIGMAS:
                with torch.no_grad(), autocast():
                    v = transformer(hidden_states=((1 - s) * x0 + s * noise).to(dtype),
                                    timestep=torch.tensor([s * 1000], dtype=torch.float32),
                                    encoder_hidden_states=batch["prompt_embeds"][i:i + 1].to(dtype),
                                    pooled_projections=batch["pooled"][i:i + 1].to(dtype), return_dict=False)[0]
                losses.append(((v.float() - (noise - x0)) ** 2 * mask).mean().item())
    return sum(losses) / len(losses)


def _calls(transformer) -> list[tuple[int, torch.dtype, bool]]:
    """(batch size, timestep dtype, under autocast) of every forward of `transformer` from now on."""
    calls = []
    transformer.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
        (kwargs["hidden_states"].shape[0], kwargs["timestep"].dtype, torch.is_autocast_enabled("cpu"))),
        with_kwargs=True)
    return calls


def test_batched_eval_loss_equals_the_per_item_forwards(tiny_sd3):
    transformer = load_transformer(tiny_sd3)
    add_lora(transformer, LoraConfig(rank=4))
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    batches, flow = _eval_set(), FlowConfig(eval_sigmas=SIGMAS)
    ref = _reference(transformer, batches)
    calls = _calls(transformer)
    # 3 pairs per forward cut across items: 9 pairs -> 3 forwards at 8x8, 6 -> 2 at 8x12.
    assert eval_loss(transformer, batches, flow, "cpu", batch_size=3) == pytest.approx(ref, rel=1e-6)
    assert calls == [(3, torch.float32, False)] * 5
    assert eval_loss(transformer, batches, flow, "cpu", batch_size=100) == pytest.approx(ref, rel=1e-6)
    unmasked = [batches[0], {k: v for k, v in batches[1].items() if k != "mask"}]
    assert abs(eval_loss(transformer, unmasked, flow, "cpu") / ref - 1) > 1e-3  # the mask weights the error

    # Shared over ranks: the forwards do not depend on the worker count, each rank runs as many (ZeRO-3's forward is
    # a collective) and the padding is left out of the sums.
    whole = eval_sums(transformer, batches, flow, "cpu", batch_size=3)
    assert whole[1] == 15 and whole[0] / whole[1] == pytest.approx(ref, rel=1e-6)
    for world in (2, 3, 4):
        calls.clear()
        shares = [eval_sums(transformer, batches, flow, "cpu", batch_size=3, rank=r, world=world) for r in range(world)]
        torch.testing.assert_close(sum(shares), whole, rtol=1e-12, atol=0)
        assert len(calls) == world * math.ceil(5 / world), (world, calls)

    # Under the training autocast (bf16 rounding: the forwards of another batch size differ by ~1e-6).
    calls.clear()
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    value = eval_loss(transformer, batches, flow, "cpu", batch_size=3, autocast=bf16())
    assert calls == [(3, torch.float32, True)] * 5
    assert value == pytest.approx(_reference(transformer, batches, bf16), rel=2e-5)


def test_eval_loss_of_a_bf16_base_gets_fp32_timesteps(tiny_sd3):
    transformer = load_transformer(tiny_sd3, torch.bfloat16)
    add_lora(transformer, LoraConfig(rank=4))
    batches = _eval_set()
    calls = _calls(transformer)
    value = eval_loss(transformer, batches, FlowConfig(eval_sigmas=SIGMAS), "cpu", torch.bfloat16, batch_size=1)
    assert {dtype for _, dtype, _ in calls} == {torch.float32}  # as training passes them
    # bf16 timesteps would move it by ~3e-4; bf16 rounding alone (memory layout) by up to ~1e-5.
    assert value == pytest.approx(_reference(transformer, batches, dtype=torch.bfloat16), rel=5e-5)


def test_validation_images_per_prompt_and_resolution_with_slg(tiny_sd3, tiny_pipe, embeds, tmp_path):
    transformer, vae, sched = load_transformer(tiny_sd3), load_vae(tiny_sd3), load_sampler(tiny_sd3)
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


def _sample_rank(rank: int, port: int, tiny_sd3: str, embeds: list[dict], folder: Path, out: dict) -> None:
    """One of two gloo ranks: the same LoRA'd tiny model on both, each sampling its share of the images."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    transformer = _trained(tiny_sd3, LoraConfig(rank=4))
    forwards = []
    transformer.register_forward_hook(lambda *_: forwards.append(1))
    paths = sample_images(transformer, load_vae(tiny_sd3), load_sampler(tiny_sd3), embeds[:2], embeds[2],
                          SHARED_CFG, folder, "cpu", save=rank == 0, rank=rank, world=2)
    out[rank] = {"paths": [p.name for p in paths], "forwards": len(forwards)}
    dist.destroy_process_group()


SHARED_CFG = ValidationConfig(prompts=["x", "y"], resolution="64x64,96x64", steps=3, guidance=3.0, seed=7)


def test_ranks_share_the_validation_images_and_rank_0_writes_what_one_rank_would(tiny_sd3, embeds, tmp_path):
    """Two real gloo ranks each sample half of the 4 images (half the forwards each); rank 0 writes all of them,
    byte for byte the files one process sampling everything writes."""
    alone = _trained(tiny_sd3, LoraConfig(rank=4))
    forwards = []
    alone.register_forward_hook(lambda *_: forwards.append(1))
    expected = sample_images(alone, load_vae(tiny_sd3), load_sampler(tiny_sd3), embeds[:2], embeds[2], SHARED_CFG,
                             tmp_path / "alone", "cpu")
    out = run_gloo_ranks(_sample_rank, tiny_sd3, embeds, tmp_path / "shared")
    r0, r1 = out[0], out[1]
    names = ["00_64x64.png", "00_96x64.png", "01_64x64.png", "01_96x64.png"]
    assert [p.name for p in expected] == r0["paths"] == names and r1["paths"] == []
    assert r0["forwards"] == r1["forwards"] == len(forwards) // 2 > 0
    for name in names:
        assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == names  # no temporary file left


def test_several_images_per_prompt_with_a_negative_prompt_are_the_pipelines_own(tiny_sd3, tiny_pipe, embeds,
                                                                                 tmp_path):
    """validation.num_images 2 and validation.negative_prompt: image K of a prompt is diffusers' pipeline called with
    the same prompt and negative-prompt embeddings and seed validation.seed + K; those embeddings (the cache's, from
    our encoders) are the pipeline's own encoding of the negative prompt."""
    prompt, negative = "a red circle on a white background", "blurry, a blue square"
    pe, pooled = encode_prompts(load_text_encoders(tiny_sd3), [prompt, negative], 77)
    _, theirs, _, theirs_pooled = tiny_pipe.encode_prompt(prompt, prompt, prompt, negative_prompt=negative,
                                                          max_sequence_length=77, do_classifier_free_guidance=True)
    torch.testing.assert_close(pe[1], theirs[0], rtol=0, atol=1e-5)  # not bitwise: ~3e-6 between the two
    torch.testing.assert_close(pooled[1], theirs_pooled[0], rtol=0, atol=1e-5)

    cfg = ValidationConfig(prompts=[prompt], resolution="64x64", steps=4, guidance=3.0, seed=5, num_images=2,
                           negative_prompt=negative)
    transformer, vae, sched = load_transformer(tiny_sd3), load_vae(tiny_sd3), load_sampler(tiny_sd3)
    paths = sample_images(transformer, vae, sched, [{"prompt": prompt, "prompt_embeds": pe[0], "pooled": pooled[0]}],
                          {"prompt_embeds": pe[1], "pooled": pooled[1]}, cfg, tmp_path / "negative", "cpu")
    assert [p.name for p in paths] == ["00_64x64.png", "00_64x64_1.png"]
    images = [np.asarray(Image.open(p)) for p in paths]
    assert not np.array_equal(images[0], images[1])  # each from its own seed
    for k, image in enumerate(images):
        ref = tiny_pipe(prompt_embeds=pe[:1], pooled_prompt_embeds=pooled[:1], negative_prompt_embeds=pe[1:],
                        negative_pooled_prompt_embeds=pooled[1:], width=64, height=64, num_inference_steps=4,
                        guidance_scale=3.0, generator=torch.Generator().manual_seed(5 + k)).images[0]
        assert np.array_equal(image, np.asarray(ref)), k
    empty = sample_images(transformer, vae, sched, [{"prompt": prompt, "prompt_embeds": pe[0], "pooled": pooled[0]}],
                          embeds[2], cfg, tmp_path / "empty", "cpu")
    assert not np.array_equal(np.asarray(Image.open(empty[0])), images[0])  # the negative prompt counts
