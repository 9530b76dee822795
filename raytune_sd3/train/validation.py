"""Validation: the eval loss (fixed sigmas, fixed noise, held-out items) and sample images with the trained LoRA.

The eval loss is plain velocity MSE at unshifted `flow.eval_sigmas`, whatever the training shift or weighting, so
trials that differ in those settings (Ray Tune) are compared on the same measure.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import torch

from raytune_sd3 import atomic
from raytune_sd3.config import FlowConfig, ValidationConfig
from raytune_sd3.flow import NUM_TRAIN_TIMESTEPS, flow_loss, noisy_input

EVAL_SEED = 20240611


@torch.no_grad()
def eval_sums(transformer, batches: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], flow: FlowConfig,
              device, dtype: torch.dtype = torch.float32, *, batch_size: int = 4, rank: int = 0, world: int = 1,
              autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """This rank's share of the eval loss: float64 tensor([sum of per-pair MSE, number of pairs]) on `device`.

    `batches`: one stacked batch per bucket ({"latents" (B, C, H, W), "prompt_embeds" (B, L, D), "pooled" (B, P),
    optional "mask" (B, 1, H, W)}). Its (item, sigma) pairs, item-major, are cut per bucket into forwards of at most
    `batch_size` pairs, forward k running on rank k % world; summed over the ranks, the result does not depend on
    `world`. Every rank runs the same number of forwards (ZeRO-3's forward is a collective): a rank short of one
    repeats a real forward and leaves it out of its sum. `autocast` is the context the training forward runs in.
    """
    sigmas = torch.tensor(flow.eval_sigmas, dtype=torch.float32)
    velocity = flow.model_copy(update={"prediction": "velocity", "weighting": "none"})
    batches = [batches] if isinstance(batches, dict) else batches
    forwards, first = [], 0  # (bucket, its first item's index in the eval set, [(item in bucket, sigma index)])
    for b, batch in enumerate(batches):
        pairs = [(i, s) for i in range(batch["latents"].shape[0]) for s in range(len(sigmas))]
        forwards += [(b, first, pairs[k:k + batch_size]) for k in range(0, len(pairs), batch_size)]
        first += batch["latents"].shape[0]
    mine = forwards[rank::world]
    per_rank = -(-len(forwards) // world)
    padding = [forwards[0]] * (per_rank - len(mine))

    was_training = transformer.training
    transformer.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0  # no host sync in the loop
    for k, (b, first, pairs) in enumerate(mine + padding):
        batch = batches[b]
        items = torch.tensor([i for i, _ in pairs])
        sigma = sigmas[[s for _, s in pairs]].to(device)
        x0 = batch["latents"][items].to(device, torch.float32)
        # Fixed noise per item, seeded by its index in the eval set: the same every call, on every rank.
        noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=torch.Generator().manual_seed(EVAL_SEED + index))
                           for index in (first + items).tolist()]).to(device)
        mask = batch["mask"][items].to(device, torch.float32) if "mask" in batch else None
        with autocast or contextlib.nullcontext():
            pred = transformer(
                hidden_states=noisy_input(x0, noise, sigma).to(dtype),
                timestep=sigma * NUM_TRAIN_TIMESTEPS,  # fp32, as in training (a bf16 timestep rounds 0.55 to 552)
                encoder_hidden_states=batch["prompt_embeds"][items].to(device, dtype),
                pooled_projections=batch["pooled"][items].to(device, dtype),
                return_dict=False,
            )[0]
        if k < len(mine):
            total += flow_loss(velocity, pred, x0, noise, sigma, mask).double().sum()
            count += len(pairs)
    transformer.train(was_training)
    return torch.stack([total, total.new_tensor(count)])


def eval_loss(transformer, batches: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], flow: FlowConfig,
              device, dtype: torch.dtype = torch.float32, *, batch_size: int = 4, rank: int = 0, world: int = 1,
              autocast: contextlib.AbstractContextManager | None = None) -> float:
    """Mean velocity MSE over every (item, sigma) pair of `batches`, the work spread over `world` ranks (every rank
    calls it, a collective when world > 1) and the same value returned on each. Noise is seeded by the item's
    index, so it is identical every call; a `mask` (masked loss) weights the error as in training. Arguments as
    eval_sums; one host sync, at the end."""
    sums = eval_sums(transformer, batches, flow, device, dtype, batch_size=batch_size, rank=rank, world=world,
                     autocast=autocast)
    if world > 1:
        torch.distributed.all_reduce(sums)
    total, count = sums.tolist()
    return total / count


def image_name(prompt: int, size: tuple[int, int], k: int = 0) -> str:
    """NN_WxH.png for prompt NN's first image at WxH, NN_WxH_K.png for the K-th after it (validation.num_images)."""
    return f"{prompt:02d}_{size[0]}x{size[1]}" + (f"_{k}" if k else "") + ".png"


@torch.no_grad()
def sample_images(transformer, vae, scheduler, embeds: list[dict], uncond: dict, cfg: ValidationConfig,
                  out_dir: Path, device, save: bool = True,
                  step_callback: Callable[[str, tuple[int, int]], Callable] | None = None,
                  rank: int = 0, world: int = 1) -> list[Path]:
    """Sample each validation prompt at each resolution, `cfg.num_images` times, with diffusers' SD3 pipeline (SLG
    when configured); write them as NN_WxH.png, then NN_WxH_K.png for the K-th more (when `save`) and return their
    paths. Image K of a prompt and size is sampled from seed `cfg.seed + K`.

    `embeds` are cached prompt embeddings ({"prompt", "prompt_embeds", "pooled"}), so no text encoder is loaded here;
    `uncond` is the negative side of classifier-free guidance (validation.negative_prompt's, or the empty caption's).
    `step_callback(prompt, (w, h))`, when given, makes the pipeline's `callback_on_step_end` for that image (live
    previews: train/previews.py).

    With `world` > 1 the images are shared out: rank r samples images r, r + world, ... (each from its own seed, so
    an image does not depend on who samples it) and rank 0 gathers their PNG bytes and writes them all, so N ranks
    that each hold the whole model take 1/N of the time. Every rank must call it then (a collective); only rank 0's
    return value lists the images.
    """
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    dtype = next(transformer.parameters()).dtype
    slg = {}
    if cfg.skip_layers:
        slg = {"skip_guidance_layers": cfg.skip_layers, "skip_layer_guidance_scale": cfg.skip_layer_scale,
               "skip_layer_guidance_start": cfg.skip_layer_start, "skip_layer_guidance_stop": cfg.skip_layer_stop}
    images = [(i, e, size, k) for i, e in enumerate(embeds) for size in cfg.sizes for k in range(cfg.num_images)]
    pngs: dict[str, bytes] = {}
    was_training = transformer.training
    transformer.eval()
    for i, e, (w, h), k in images[rank::world]:
        image = pipe(
            prompt_embeds=e["prompt_embeds"][None].to(device, dtype),
            pooled_prompt_embeds=e["pooled"][None].to(device, dtype),
            negative_prompt_embeds=uncond["prompt_embeds"][None].to(device, dtype),
            negative_pooled_prompt_embeds=uncond["pooled"][None].to(device, dtype),
            height=h, width=w, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
            generator=torch.Generator().manual_seed(cfg.seed + k),
            callback_on_step_end=step_callback(e["prompt"], (w, h)) if step_callback else None, **slg,
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs[image_name(i, (w, h), k)] = buffer.getvalue()
    transformer.train(was_training)
    if world > 1:
        shares = [None] * world if rank == 0 else None
        torch.distributed.gather_object(pngs, shares, dst=0)
        if rank != 0:
            return []
        pngs = {name: png for share in shares for name, png in share.items()}
    if save:  # under ZeRO-3 every rank samples every image (each holds a shard); one writes
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, _, size, k in images:
        path = out_dir / image_name(i, size, k)
        if save:
            atomic.write_bytes(path, pngs[path.name])
        written.append(path)
    return written
