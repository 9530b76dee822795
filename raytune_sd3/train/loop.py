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
from raytune_sd3.data.reader import CachedBatches, Prefetcher, read_manifest, split_eval
from raytune_sd3.flow import flow_loss, make_flow_batch
from raytune_sd3.models.loading import DTYPES, load_scheduler, load_transformer, load_vae
from raytune_sd3.models.lora import add_lora
from raytune_sd3.models.quantize import quantize_transformer
from raytune_sd3.train.flops import count_flops, peak_tflops
from raytune_sd3.train.optim import make_optimizer
from raytune_sd3.train.state import (
    file_sizes,
    load_checkpoint,
    load_optimizer,
    newest_on_storage,
    read_record,
    save_checkpoint,
    save_optimizer,
    write_record,
)
from raytune_sd3.train.strategy import make_strategy
from raytune_sd3.train.tracking import Tracker
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


def make_scheduler(optimizer, cfg: JobConfig):
    from diffusers.optimization import get_scheduler

    t = cfg.train
    name = "constant_with_warmup" if t.lr_scheduler == "constant" and t.lr_warmup_steps else t.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps)


def divergence_reason(metrics: dict, initial_eval: float | None, nonfinite: int, cfg: JobConfig) -> str | None:
    """Why this run should stop as diverged, or None. Uses values that are identical on every rank."""
    t = cfg.train
    if nonfinite > t.max_nonfinite_steps:
        return f"{nonfinite} steps with a non-finite loss or gradient (train.max_nonfinite_steps={t.max_nonfinite_steps})"
    ev = metrics.get("eval_loss")
    if ev is not None and not math.isfinite(ev):
        return "eval loss is not finite"
    if ev is not None and t.divergence_factor and initial_eval and ev > t.divergence_factor * initial_eval:
        return f"eval loss {ev:.4g} rose above {t.divergence_factor} x its initial {initial_eval:.4g}"
    gn = metrics.get("grad_norm")
    if t.grad_norm_limit and gn is not None and math.isfinite(gn) and gn > t.grad_norm_limit:
        return f"gradient norm {gn:.4g} above train.grad_norm_limit={t.grad_norm_limit}"
    return None


def _step_seed(seed: int, step: int, slot: int) -> int:
    """Seed of the sigmas and noise of one micro-batch; `slot` = micro * world + rank is its place in the global
    batch, so a run on fewer workers with more accumulation (elastic) draws the same noise for the same images."""
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(1)[0])


def _resume_point(run_dir: str | None, rank: int, world: int):
    """A context giving the checkpoint folder to resume from (None: a fresh start): Ray Train's registered
    checkpoint, or a newer complete one that reached storage before Ray Train registered it (train/state.py).
    Rank 0 decides, so every rank loads the same one."""
    import ray.train

    registered = ray.train.get_checkpoint()
    choice: list = [None]
    if rank == 0:
        found = newest_on_storage(Path(run_dir)) if run_dir and Path(run_dir).is_dir() else None
        record = read_record(Path(registered.path)) if registered is not None and Path(registered.path).is_dir() else None
        if found and (registered is None or (record is not None and found[0] > record["step"])):
            known = f"step {record['step']}" if registered is not None else "none"
            print(f"raytune_sd3: resuming from step {found[0]} ({found[1].name}), the newest complete checkpoint on "
                  f"storage (Ray Train had registered {known})", flush=True)
            choice = [str(found[1])]
        elif registered is not None:
            print("raytune_sd3: resuming from " + (f"step {record['step']} " if record else "")
                  + f"(Ray Train's checkpoint {Path(registered.path).name})", flush=True)
            choice = ["registered"]
    if world > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    if choice[0] == "registered":
        return registered.as_directory()
    return contextlib.nullcontext(choice[0])


class _Progress:
    """Where the loop is, for the error it may raise (driver/faults.py tells a bug from a lost worker by it)."""

    step: int | None = None


def train_loop_per_worker(config: dict) -> None:
    progress = _Progress()
    try:
        _train(config, progress)
    except Exception as e:
        e.raytune_sd3_step = progress.step  # pickled with the exception, read on Ray Train's controller
        raise


def _train(config: dict, progress: _Progress) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = JobConfig.model_validate(config["job"])
    pretrained, t = config["pretrained"], cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if ray.get_gpu_ids() and not torch.cuda.is_available():  # before get_device(), which asserts on it
        raise RuntimeError(
            f"Ray gave this worker GPU(s) {ray.get_gpu_ids()}, but torch {torch.__version__} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda or 'no'}): install a CUDA build of torch on the GPU nodes, or set "
            "train.use_gpu: false to train on CPUs")
    device = ray.train.torch.get_device()
    out_dir = Path(cfg.output_dir)
    dtype = DTYPES[cfg.model.dtype]

    # --- setup: frozen base + LoRA; the strategy (DDP or DeepSpeed) reduces the LoRA's gradients
    transformer = quantize_transformer(load_transformer(pretrained, dtype, cfg.model.revision), cfg.model.quantize)
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = add_lora(transformer, cfg.lora, seed=t.seed)
    transformer.to(device)
    if t.compile:  # in place: parameter names (and so checkpoints and the saved LoRA) stay as they are
        transformer.compile()
    optimizer = make_optimizer(params, t)
    scheduler = make_scheduler(optimizer, cfg)
    start_step, resumed = 0, {}
    with _resume_point(config.get("run_dir"), rank, world) as folder:
        if folder is not None:  # LoRA weights before the strategy wraps them (ZeRO-3 partitions them)
            start_step, resumed = load_checkpoint(Path(folder), transformer, scheduler)
        strategy = make_strategy(transformer, params, optimizer, cfg, world)
        if folder is not None:
            strategy.load_optimizer_state(load_optimizer(Path(folder), rank if strategy.sharded_optimizer else 0))

    manifest = read_manifest(config["manifest"])
    train_rows, eval_rows = split_eval(manifest["rows"], cfg.data.eval_samples)
    reader = CachedBatches(manifest, train_rows, t.seed, cfg.data.caption_dropout, cfg.text.uncond,
                           t.global_batch, cfg.data.small_buckets, t.prior_loss_weight,
                           memory_budget=int(cfg.data.memory_cache_gb * 2**30))
    # Every rank runs a share of the eval forwards. Sampling runs on rank 0 alone, except under ZeRO-3, where a
    # forward pass needs every rank.
    runs_sampling = rank == 0 or strategy.sharded_params
    eval_batches = reader.load_buckets(eval_rows) if eval_rows else []
    log = MetricsLog(out_dir / METRICS, start_step) if rank == 0 else None
    tracker = Tracker(cfg, active=rank == 0)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t.mixed_precision == "bf16"
                else contextlib.nullcontext())
    vae = None

    def validate(step: int) -> None:
        nonlocal vae
        if not runs_sampling or not cfg.validation.prompts:
            return
        vae = vae or load_vae(pretrained, device, dtype, cfg.model.revision)
        embeds = [{"prompt": v["prompt"], **reader.store.read("text", v["text_key"])} for v in manifest["validation"]]
        uncond = reader.store.read("text", manifest["uncond_key"])
        if cfg.text.uncond == "zero":
            uncond = {k: torch.zeros_like(v) for k, v in uncond.items()}
        folder = out_dir / "validation" / f"step_{step:06d}"
        sample_images(strategy.module, vae, load_scheduler(pretrained, cfg.model.revision), embeds,
                      uncond, cfg.validation, folder, device, save=rank == 0)
        tracker.log_images(folder, step, cfg.validation.prompts)

    def measure_eval() -> float:
        """The same value on every rank (all-reduced), so stop decisions agree."""
        return eval_loss(strategy.module, eval_batches, cfg.flow, device, dtype, batch_size=t.batch_size, rank=rank,
                         world=world, autocast=autocast)

    def report(metrics: dict, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        lora = strategy.lora_tensors()  # a collective under ZeRO-3: every rank calls it
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            if rank == 0:
                save_checkpoint(folder, lora, cfg.lora, scheduler, metrics["step"],
                                {"initial_eval": initial_eval, "nonfinite": nonfinite})
            if rank == 0 or strategy.sharded_optimizer:
                save_optimizer(folder, rank, strategy.optimizer_state())
            sizes = [file_sizes(folder)]
            if world > 1:  # rank 0's record lists every rank's files: a partly uploaded checkpoint is not complete
                sizes = [None] * world
                torch.distributed.all_gather_object(sizes, file_sizes(folder))
            if rank == 0:
                write_record(folder, metrics["step"], {k: v for s in sizes for k, v in s.items()})
            has_files = any(folder.iterdir())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)

    initial_eval = resumed.get("initial_eval")
    if eval_rows and start_step == 0:
        initial_eval = measure_eval()
        if log is not None:
            log.write({"step": 0, "eval_loss": initial_eval})
            tracker.log({"step": 0, "eval_loss": initial_eval})

    # --- train
    strategy.model.train()
    accum = t.accum_for(world)  # elastic: more micro-steps on fewer workers, same global batch
    global_batch = t.batch_size * accum * world
    nonfinite = resumed.get("nonfinite", 0)
    batches = Prefetcher(reader, [(s - 1, m, accum, rank, world, t.batch_size) for s in range(start_step + 1,
                                  t.max_steps + 1) for m in range(accum)],
                         pin=device.type == "cuda", background=device.type == "cuda")  # a thread pays on GPUs only
    peak = peak_tflops(device, t.peak_tflops)  # MFU is logged where the card's peak is known
    flops_of_shape: dict[tuple, int] = {}

    def forward(model, batch, latents, fb):
        return model(hidden_states=fb.noisy, timestep=fb.timesteps,
                     encoder_hidden_states=batch["prompt_embeds"].to(device, dtype, non_blocking=True),
                     pooled_projections=batch["pooled"].to(device, dtype, non_blocking=True), return_dict=False)[0]

    def train_flops(batch, latents, fb) -> int:
        """F_train of one micro-batch (train/flops.py), counted once per bucket shape by an extra forward pass:
        every rank reaches a new shape at the same step (one bucket per step), as ZeRO-3's gathers need."""
        shape = tuple(latents.shape)
        if shape not in flops_of_shape:
            with autocast:
                flops_of_shape[shape] = count_flops(strategy.module, lambda: forward(strategy.module, batch, latents,
                                                                                     fb), device).training()
        return flops_of_shape[shape]

    for step in range(start_step + 1, t.max_steps + 1):
        progress.step = step
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        step_flops = 0
        for micro in range(accum):
            batch = batches.get()
            latents = batch["latents"].to(device, dtype, non_blocking=True)
            fb = make_flow_batch(cfg.flow, latents, torch.Generator().manual_seed(_step_seed(t.seed, step, micro * world + rank)))
            if peak:
                c0 = time.perf_counter()
                step_flops += train_flops(batch, latents, fb)
                t0 += time.perf_counter() - c0  # the counting pass is not training time
            with strategy.accumulating(sync=micro == accum - 1), autocast:
                pred = forward(strategy.model, batch, latents, fb)
                mask = batch["mask"].to(device) if "mask" in batch else None
                per_sample = flow_loss(cfg.flow, pred, latents, fb.noise, fb.sigmas, mask)
                loss = (per_sample * batch["loss_weight"].to(device)).mean() / accum
                strategy.backward(loss)
            loss_sum += loss.detach()
        if world > 1:  # the logged loss is the global batch's mean; NaN anywhere is NaN everywhere
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
        loss_value = loss_sum.item()
        lr = scheduler.get_last_lr()[0]
        grad_norm, stepped = strategy.step(math.isfinite(loss_value))
        if not stepped:  # the update was skipped; the schedule moves on so a resumed run stays aligned
            nonfinite += 1
        scheduler.step()
        step_time = time.perf_counter() - t0
        metrics = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "step_time_s": step_time,
                   "images_per_s": global_batch / step_time, "epoch": step / reader.steps_per_epoch,
                   "nonfinite_steps": nonfinite, "workers": world}
        if peak:  # this rank's model FLOPs over its step time, against one card's peak
            metrics.update(tflops_per_s=step_flops / step_time / 1e12, mfu=step_flops / step_time / (peak * 1e12))

        last = step == t.max_steps
        if eval_rows and (last or (t.eval_every and step % t.eval_every == 0)):
            metrics["eval_loss"] = measure_eval()
        reason = divergence_reason(metrics, initial_eval, nonfinite, cfg)
        if reason:
            metrics.update(diverged=1, diverged_reason=reason)
        elif last or (cfg.validation.every_steps and step % cfg.validation.every_steps == 0):
            validate(step)
        if log is not None:
            log.write(metrics)
            tracker.log(metrics)
        checkpoint = not reason and (last or step % t.checkpoint_every == 0)
        # Decided from values equal on every rank: each report is a barrier that all ranks must reach.
        if checkpoint or reason or "eval_loss" in metrics or step % t.report_every == 0:
            report(metrics, with_checkpoint=checkpoint)
        if reason:
            break
    batches.close()
    tracker.finish()
