"""Validation: the eval loss (fixed sigmas, fixed noise, held-out items) and sample images with the trained LoRA.

The eval loss is plain velocity MSE at unshifted `flow.eval_sigmas`, whatever the training shift or weighting, so
trials that differ in those settings (Ray Tune) are compared on the same measure.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raytune_sd3.config import FlowConfig, ValidationConfig
from raytune_sd3.flow import NUM_TRAIN_TIMESTEPS, noisy_input

EVAL_SEED = 20240611


@torch.no_grad()
def eval_loss(transformer, batches: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], flow: FlowConfig,
              device, dtype=torch.float32) -> float:
    """Mean velocity MSE over every (item, sigma) pair of `batches` (one stacked batch per bucket); noise seeded
    by the item's index, so it is identical every call. A `mask` (masked loss) weights the error as in training."""
    was_training = transformer.training
    transformer.eval()
    total, count, index = 0.0, 0, 0
    for batch in [batches] if isinstance(batches, dict) else batches:
        latents = batch["latents"].to(device, torch.float32)
        for i in range(latents.shape[0]):
            x0 = latents[i : i + 1]
            mask = batch["mask"][i : i + 1].to(device, torch.float32) if "mask" in batch else 1.0
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(EVAL_SEED + index)).to(device)
            index += 1
            for s in flow.eval_sigmas:
                sigma = torch.tensor([s], device=device)
                pred = transformer(
                    hidden_states=noisy_input(x0, noise, sigma).to(dtype),
                    timestep=(sigma * NUM_TRAIN_TIMESTEPS).to(dtype),
                    encoder_hidden_states=batch["prompt_embeds"][i : i + 1].to(device, dtype),
                    pooled_projections=batch["pooled"][i : i + 1].to(device, dtype),
                    return_dict=False,
                )[0]
                total += torch.mean((pred.float() - (noise - x0)) ** 2 * mask).item()
                count += 1
    transformer.train(was_training)
    return total / count


@torch.no_grad()
def sample_images(transformer, vae, scheduler, embeds: list[dict], uncond: dict, cfg: ValidationConfig,
                  out_dir: Path, device, save: bool = True) -> list[Path]:
    """Sample each validation prompt at each resolution with diffusers' SD3 pipeline (SLG when configured).

    `embeds` are cached prompt embeddings ({"prompt", "prompt_embeds", "pooled"}), so no text encoder is loaded here.
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
    if save:
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    was_training = transformer.training
    transformer.eval()
    for i, e in enumerate(embeds):
        for w, h in cfg.sizes:
            image = pipe(
                prompt_embeds=e["prompt_embeds"][None].to(device, dtype),
                pooled_prompt_embeds=e["pooled"][None].to(device, dtype),
                negative_prompt_embeds=uncond["prompt_embeds"][None].to(device, dtype),
                negative_pooled_prompt_embeds=uncond["pooled"][None].to(device, dtype),
                height=h, width=w, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                generator=torch.Generator().manual_seed(cfg.seed), **slg,
            ).images[0]
            path = out_dir / f"{i:02d}_{w}x{h}.png"
            if save:  # under ZeRO-3 every rank samples (each holds a shard); one writes
                tmp = path.with_suffix(".tmp.png")
                image.save(tmp)
                tmp.replace(path)
            written.append(path)
    transformer.train(was_training)
    return written
