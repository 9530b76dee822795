"""The per-worker training loop that Ray Train runs on every worker: read it top to bottom like a recipe.

setup (model + LoRA + DDP, optimizer, resume) -> for each optimizer step: grad-accumulated flow-matching loss,
clip, step, metrics (+ eval loss, validation images, checkpoint) -> final checkpoint with the LoRA.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raytune_sd3.config import JobConfig
from raytune_sd3.data.reader import CachedBatches, read_manifest, split_eval
from raytune_sd3.flow import flow_loss, make_flow_batch
from raytune_sd3.models.loading import DTYPES, load_scheduler, load_transformer, load_vae
from raytune_sd3.models.lora import add_lora
from raytune_sd3.train.state import load_checkpoint, save_checkpoint
from raytune_sd3.train.validation import eval_loss, sample_images

METRICS = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl, one JSON object per line; on resume, lines past the restored step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        tmp.replace(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def make_optimizer(params, cfg: JobConfig):
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                             weight_decay=t.weight_decay)


def make_scheduler(optimizer, cfg: JobConfig):
    from diffusers.optimization import get_scheduler

    t = cfg.train
    name = "constant_with_warmup" if t.lr_scheduler == "constant" and t.lr_warmup_steps else t.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps)


def clip_gradients(params, cfg: JobConfig) -> torch.Tensor:
    """Clip by global norm (default) or by value; returns the global gradient norm before clipping."""
    t = cfg.train
    if t.grad_clip == "norm":
        return torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)
    norm = torch.nn.utils.clip_grad_norm_(params, math.inf)
    if t.max_grad_norm:
        torch.nn.utils.clip_grad_value_(params, t.max_grad_norm)
    return norm


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = JobConfig.model_validate(config["job"])
    pretrained, t = config["pretrained"], cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    out_dir = Path(cfg.output_dir)

    # --- setup: frozen base + LoRA, DDP over the LoRA parameters only
    transformer = load_transformer(pretrained, DTYPES[cfg.model.dtype], cfg.model.revision)
    params = add_lora(transformer, cfg.lora, seed=t.seed)
    transformer.to(device)
    model = ray.train.torch.prepare_model(transformer, parallel_strategy="ddp" if world > 1 else None)
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_step = load_checkpoint(Path(folder), transformer, optimizer, scheduler)

    manifest = read_manifest(config["manifest"])
    train_rows, eval_rows = split_eval(manifest["rows"], cfg.data.eval_samples)
    reader = CachedBatches(manifest, train_rows, t.seed, cfg.data.caption_dropout, cfg.text.uncond)
    eval_batch = reader.load(eval_rows) if eval_rows and rank == 0 else None
    log = MetricsLog(out_dir / "metrics.jsonl", start_step) if rank == 0 else None
    dtype = DTYPES[cfg.model.dtype]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t.mixed_precision == "bf16"
                else contextlib.nullcontext())
    vae = None

    def validate(step: int) -> None:
        nonlocal vae
        if rank != 0 or not cfg.validation.prompts:
            return
        vae = vae or load_vae(pretrained, device, dtype, cfg.model.revision)
        embeds = [{"prompt": v["prompt"], **reader.store.read("text", v["text_key"])} for v in manifest["validation"]]
        uncond = reader.store.read("text", manifest["uncond_key"])
        if cfg.text.uncond == "zero":
            uncond = {k: torch.zeros_like(v) for k, v in uncond.items()}
        sample_images(transformer, vae, load_scheduler(pretrained, cfg.model.revision), embeds, uncond,
                      cfg.validation, out_dir / "validation" / f"step_{step:06d}", device)

    if start_step == 0 and log is not None and eval_batch is not None:
        log.write({"step": 0, "eval_loss": eval_loss(transformer, eval_batch, cfg.flow, device, dtype)})

    # --- train
    model.train()
    global_batch = t.batch_size * t.grad_accum * world
    for step in range(start_step + 1, t.max_steps + 1):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(t.grad_accum):
            batch = reader.micro_batch(step - 1, micro, t.grad_accum, rank, world, t.batch_size)
            latents = batch["latents"].to(device, dtype)
            fb = make_flow_batch(cfg.flow, latents, torch.Generator().manual_seed(_step_seed(t.seed, step, micro, rank)))
            sync = micro == t.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                pred = model(hidden_states=fb.noisy, timestep=fb.timesteps,
                             encoder_hidden_states=batch["prompt_embeds"].to(device, dtype),
                             pooled_projections=batch["pooled"].to(device, dtype), return_dict=False)[0]
                loss = flow_loss(cfg.flow, pred, latents, fb.noise, fb.sigmas).mean() / t.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = clip_gradients(params, cfg)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
        step_time = time.perf_counter() - t0
        metrics = {"step": step, "loss": loss_sum.item(), "lr": lr, "grad_norm": float(grad_norm),
                   "step_time_s": step_time, "images_per_s": global_batch / step_time, "epoch": (
                       step * global_batch) / len(train_rows)}

        last = step == t.max_steps
        if eval_batch is not None and (last or (t.eval_every and step % t.eval_every == 0)):
            metrics["eval_loss"] = eval_loss(transformer, eval_batch, cfg.flow, device, dtype)
        if last or (cfg.validation.every_steps and step % cfg.validation.every_steps == 0):
            validate(step)
        if log is not None:
            log.write(metrics)

        if last or step % t.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_checkpoint(Path(tmp), transformer, cfg.lora, optimizer, scheduler, step)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)
