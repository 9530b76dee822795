"""The per-worker training loop that Ray Train runs on every worker: read it top to bottom like a recipe.

setup (model + LoRA + DDP, optimizer, resume) -> for each optimizer step: grad-accumulated flow-matching loss,
clip, step, metrics (+ eval loss, validation images, checkpoint) -> final checkpoint with the LoRA.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raytune_sd3 import atomic
from raytune_sd3.config import OPTIMIZERS, JobConfig
from raytune_sd3.data.manifest import READER_COLUMNS, read_manifest, split_eval
from raytune_sd3.data.reader import CachedBatches, Prefetcher
from raytune_sd3.flow import (
    draw_noise,
    draw_rollout_steps,
    flow_loss,
    make_flow_batch,
    resolve_shift,
    rolled_out_input,
)
from raytune_sd3.models.loading import (
    DTYPES,
    compile_blocks,
    leave_out_bitsandbytes,
    load_sampler,
    load_transformer,
    load_vae,
)
from raytune_sd3.models.lora import LoraAutocast, add_lora, export_lora
from raytune_sd3.models.lora_files import load_lora_file, read_lora_file
from raytune_sd3.models.quantize import NF4_NEEDS_CUDA, quantize_transformer
from raytune_sd3.run_layout import EMA_LORA, RunLayout
from raytune_sd3.train.attention import attention_kernel, sampling_attention
from raytune_sd3.train.checkpoint import load_checkpoint, load_optimizer, resume_point, write_checkpoint
from raytune_sd3.train.ema import LoraEma
from raytune_sd3.train.flops import FlopCount, count_flops, peak_tflops
from raytune_sd3.train.optim import (
    applied_lr,
    averaged_weights,
    make_optimizer,
    optimizer_metrics,
    start_training,
)
from raytune_sd3.train.strategy import make_strategy
from raytune_sd3.train.tracking import Tracker
from raytune_sd3.train.validation import eval_loss, sample_images
from raytune_sd3.train.validation_extras import ValidationExtras


class MetricsLog:
    """metrics.jsonl, one JSON object per line; on resume, lines past the restored step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
        atomic.write_text(path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def make_lr_schedule(optimizer, cfg: JobConfig):
    """The learning-rate schedule of train.lr_scheduler (diffusers' get_scheduler) with warmup; a schedule-free
    optimizer's is flat (it warms up by itself: train/optim.py)."""
    from diffusers.optimization import get_scheduler

    t = cfg.train
    warmup = 0 if OPTIMIZERS[t.optimizer].schedule_free else t.lr_warmup_steps
    name = "constant_with_warmup" if t.lr_scheduler == "constant" and warmup else t.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=t.max_steps,
                         num_cycles=t.lr_num_cycles, power=t.lr_power)


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


ROLLOUT_STREAM = 1  # the rollout draws' own stream: the noise stream stays what it is with the feature on or off


def _step_seed(seed: int, step: int, slot: int, *stream: int) -> int:
    """Seed of the sigmas and noise of one micro-batch (of its rollout draws with `stream` ROLLOUT_STREAM); `slot` =
    micro * world + rank is its place in the global batch, so a run on fewer workers with more accumulation
    (elastic) draws the same noise for the same images. Nothing of it is kept in a checkpoint: a resumed step
    draws from the same seed."""
    return int(np.random.SeedSequence([seed, step, slot, *stream]).generate_state(1)[0])


def rollout_steps_of(cfg: JobConfig, step: int, slot: int) -> torch.Tensor:
    """The rollout lengths (train.batch_size,) of the micro-batch at `slot` of optimizer step `step` (1-based)."""
    ss = cfg.flow.scheduled_sampling
    generator = torch.Generator().manual_seed(_step_seed(cfg.train.seed, step, slot, ROLLOUT_STREAM))
    return draw_rollout_steps(ss, step, cfg.train.batch_size, generator)


def train_loop_per_worker(config: dict) -> None:
    """What Ray Train runs on every worker: setup, then the steps. An error carries the step it happened at
    (`raytune_sd3_step`, pickled with it; driver/faults.py tells a bug from a lost worker by it)."""
    run = WorkerRun(config)
    try:
        run.setup()
        run.train()
    except Exception as e:
        e.raytune_sd3_step = run.step
        raise
    finally:
        run.close()


class WorkerRun:
    """One worker's training run, in named steps (a recipe, as torchtune's): setup -> for each step: train_step ->
    evaluate (at eval steps) -> validate (sample images) -> log -> report (with a checkpoint at checkpoint steps)."""

    def __init__(self, config: dict):
        import ray
        import ray.train
        import ray.train.torch

        self.config = config
        self.cfg = cfg = JobConfig.model_validate(config["job"])
        if not cfg.bitsandbytes_parts:
            leave_out_bitsandbytes()  # before diffusers and peft load
        self.t, self.pretrained = cfg.train, config["pretrained"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if ray.get_gpu_ids() and not torch.cuda.is_available():  # before get_device(), which asserts on it
            raise RuntimeError(
                f"Ray gave this worker GPU(s) {ray.get_gpu_ids()}, but torch {torch.__version__} sees no CUDA device "
                f"(CUDA build: {torch.version.cuda or 'no'}): install a CUDA build of torch on the GPU nodes, or set "
                "train.use_gpu: false to train on CPUs")
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":  # the object collectives (resume choice, checkpoint record) use the current
            torch.cuda.set_device(self.device)  # device: on a node of eight, each rank's own, never all on cuda:0
        self.layout = RunLayout.of(cfg)
        self.dtype = DTYPES[cfg.model.dtype]
        self.autocast = contextlib.nullcontext()  # the forwards' precision context: bf16 autocast once the LoRA is on
        self.attention = attention_kernel(self.t.attention)
        self.step: int | None = None  # the step being trained (None during setup)
        self.batches = self.tracker = self.vae = None
        self.ema: LoraEma | None = None  # the EMA of the LoRA weights (train.ema_decay)
        self.validation_extras: ValidationExtras | None = None  # CLIP score and previews, on rank 0
        self.flops_of_shape: dict[tuple, FlopCount] = {}
        # Ray Train's own switch for its preemption watcher (read by its controller from the same environment).
        self.watch_preemption = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1").lower() not in ("0", "false")
        self.notice_seen = False  # one checkpoint a notice: this attempt's workers go with the node

    # --- setup ---------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        self._setup_model()
        self._setup_data()

    def _setup_model(self) -> None:
        """Frozen base + LoRA, optimizer and LR schedule, the checkpoint to resume from, then the strategy (DDP or
        DeepSpeed) that reduces the LoRA's gradients."""
        cfg, t = self.cfg, self.t
        if cfg.model.quantize == "nf4" and self.device.type != "cuda":  # the driver's preflight says it first
            raise RuntimeError(NF4_NEEDS_CUDA)
        transformer = quantize_transformer(load_transformer(self.pretrained, self.dtype, cfg.model.revision),
                                           cfg.model.quantize, device=self.device)
        if t.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        params = add_lora(transformer, cfg.lora, seed=t.seed)
        if cfg.lora.init_from is not None:  # a resume below overwrites it with the checkpoint's weights
            load_lora_file(transformer, read_lora_file(cfg.lora.init_from))
        if t.mixed_precision == "bf16":
            self.autocast = LoraAutocast(transformer, self.device.type)
        transformer.to(self.device)
        if t.compile:  # in place: parameter names (and so checkpoints and the saved LoRA) stay as they are
            compile_blocks(transformer)
        self.optimizer = optimizer = make_optimizer(params, t)
        self.lr_schedule = make_lr_schedule(optimizer, cfg)
        self.start_step, resumed = 0, {}
        with resume_point(self.config.get("run_dir"), self.rank, self.world) as folder:
            if folder is not None:  # LoRA weights before the strategy wraps them (ZeRO-3 partitions them)
                self.start_step, resumed = load_checkpoint(Path(folder), transformer, self.lr_schedule)
            if t.ema_decay is not None:  # every rank keeps it (the same on each: train/ema.py)
                self.ema = LoraEma(transformer, t.ema_decay)
                if folder is not None:
                    self.ema.load(Path(folder))
            self.strategy = make_strategy(transformer, params, optimizer, cfg, self.world)
            if folder is not None:
                shard = self.rank if self.strategy.sharded_optimizer else 0
                self.strategy.load_optimizer_state(load_optimizer(Path(folder), shard))
        start_training(optimizer)
        self.initial_eval = resumed.get("initial_eval")
        self.nonfinite = resumed.get("nonfinite", 0)

    def _setup_data(self) -> None:
        """The cache reader (this rank's micro-batches, read ahead), the eval set, metrics.jsonl and W&B."""
        cfg, t = self.cfg, self.t
        self.manifest = read_manifest(self.config["manifest"], READER_COLUMNS)  # only the columns it trains with
        train_rows, eval_rows = split_eval(self.manifest["rows"], cfg.data.eval_samples)
        self.reader = CachedBatches(self.manifest, train_rows, t.seed, cfg.data.caption_dropout, cfg.text.uncond,
                                    t.global_batch, cfg.data.small_buckets, t.prior_loss_weight,
                                    memory_budget=int(cfg.data.memory_cache_gb * 2**30))
        # Every rank runs a share of the eval forwards (and of the validation images: validate).
        self.eval_batches = self.reader.load_buckets(eval_rows) if eval_rows else []
        self.log = MetricsLog(self.layout.metrics, self.start_step) if self.rank == 0 else None
        self.tracker = Tracker(cfg, active=self.rank == 0)
        self.accum = t.accum_for(self.world)  # elastic: more micro-steps on fewer workers, same global batch
        steps = range(self.start_step + 1, t.max_steps + 1)
        on_gpu = self.device.type == "cuda"  # a read-ahead thread pays on GPUs only (benchmarks/RESULTS.md)
        self.batches = Prefetcher(self.reader, [(s - 1, m, self.accum, self.rank, self.world, t.batch_size)
                                                for s in steps for m in range(self.accum)], pin=on_gpu,
                                  background=on_gpu, then=self._with_noise)
        self.peak = peak_tflops(self.device, t.peak_tflops)  # MFU is logged where the card's peak is known
        if self.rank == 0:
            self.validation_extras = ValidationExtras(cfg.validation, self.config.get("clip_model"),
                                                      self.config.get("preview_model"), self.device, self.dtype)

    # --- the steps -------------------------------------------------------------------------------------------------

    def train(self) -> None:
        t = self.t
        if self.config.get("revalidate") and self.start_step == t.max_steps:
            self.revalidate()
            return
        if self.eval_batches and self.start_step == 0:
            self.step = 0
            self.initial_eval = self.evaluate()
            self._log({"step": 0, "eval_loss": self.initial_eval})
        self.strategy.wrapped.train()
        for step in range(self.start_step + 1, t.max_steps + 1):
            self.step = step
            metrics = self.train_step(step)
            last = step == t.max_steps
            if self.eval_batches and (last or (t.eval_every and step % t.eval_every == 0)):
                metrics["eval_loss"] = self.evaluate()
            reason = divergence_reason(metrics, self.initial_eval, self.nonfinite, self.cfg)
            if reason:
                metrics.update(diverged=1, diverged_reason=reason)
            elif last or (self.cfg.validation.every_steps and step % self.cfg.validation.every_steps == 0):
                metrics.update(self.validate(step))
            self._log(metrics)
            notice = self._preemption_notice(step)  # a collective: every rank, every step
            checkpoint = not reason and (last or step % t.checkpoint_every == 0 or notice)
            # Decided from values equal on every rank: each report is a barrier that all ranks must reach.
            if checkpoint or reason or "eval_loss" in metrics or step % t.report_every == 0:
                self.report(metrics, with_checkpoint=checkpoint)
            if reason:
                break

    def _preemption_notice(self, step: int) -> bool:
        """True at the first step after Ray said that a node of this run will be drained (a spot or preemptible node
        being reclaimed): that step is checkpointed at once, so the restart, which Ray Train charges to
        FailureConfig.max_preemption_failures and not max_failures, resumes from it rather than from the last
        periodic checkpoint. Ray 2.60's preemption watcher (train/v2/_internal/execution/preemption.py) polls the
        GCS's draining nodes and marks the workers; ray.train.get_preemption_info() broadcasts rank 0's view, so
        every rank answers alike. Off where the watcher is off (a local Ray: driver/runtime.py)."""
        import ray.train

        if self.notice_seen or not self.watch_preemption:
            return False
        info = ray.train.get_preemption_info()
        if info is None:
            return False
        self.notice_seen = True
        if self.rank == 0:
            left = f", {info.deadline_ms / 1000 - time.time():.0f} s left" if info.deadline_ms else ""
            print(f"raytune_sd3: preemption notice for node(s) {', '.join(info.preempted_node_ids)} (ranks "
                  f"{info.preempted_ranks}{left}): checkpoint at step {step}", flush=True)
        return True

    def revalidate(self) -> None:
        """A finished run resumed with changed validation settings: its final LoRA validated again with them, no
        step trained; the final step's metrics line is repeated with the new measures (curves and model card read
        the last line)."""
        step = self.step = self.t.max_steps
        final = {}
        if self.log is not None:
            lines = [json.loads(ln) for ln in self.log.path.read_text().splitlines() if ln.strip()]
            final = next((r for r in reversed(lines) if r.get("step") == step), {})
        final.pop("clip_score", None)
        metrics = {**final, "step": step, **self.validate(step), "revalidated": 1}
        self._log(metrics)
        self.report(metrics, with_checkpoint=False)

    def train_step(self, step: int) -> dict:
        """One optimizer step over `accum` micro-batches: flow-matching loss, backward, clip, update. Returns its
        metrics (loss and gradient norm as every rank sees them)."""
        cfg, t, device, world = self.cfg, self.t, self.device, self.world
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        step_flops = 0
        with self.attention():
            for micro in range(self.accum):
                batch = self.batches.get()
                latents = batch["latents"].to(device, self.dtype, non_blocking=True)
                fb = make_flow_batch(cfg.flow, latents, sigmas=batch["sigmas"], noise=batch["noise"])
                if self.peak:
                    c0 = time.perf_counter()
                    step_flops += self._train_flops(batch, latents, fb)
                    t0 += time.perf_counter() - c0  # the counting pass is not training time
                rolled = None
                if "rollout_steps" in batch and batch["rollout_steps"].any():
                    rolled = fb.noisy = self._roll_out(batch, latents, fb)
                with self.strategy.accumulating(sync=micro == self.accum - 1), self.autocast:
                    pred = self._forward(self.strategy.wrapped, batch, fb)
                    mask = batch["mask"].to(device, non_blocking=True) if "mask" in batch else None
                    per_sample = flow_loss(cfg.flow, pred, latents, fb.noise, fb.sigmas, mask, noisy=rolled)
                    loss = (per_sample * batch["loss_weight"].to(device, non_blocking=True)).mean() / self.accum
                    self.strategy.backward(loss)
                loss_sum += loss.detach()
        if world > 1:  # the logged loss is the global batch's mean; NaN anywhere is NaN everywhere
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
        lr = applied_lr(self.optimizer, self.lr_schedule.get_last_lr()[0])
        result = self.strategy.step(loss_sum)  # the step's one host read of device values
        if not result.stepped:  # the update was skipped; the schedule moves on so a resumed run stays aligned
            self.nonfinite += 1
        elif self.ema is not None:
            self.ema.update()
        self.lr_schedule.step()
        step_time = time.perf_counter() - t0
        metrics = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                   "step_time_s": step_time,
                   "images_per_s": t.batch_size * self.accum * world / step_time,
                   "epoch": step / self.reader.steps_per_epoch, "nonfinite_steps": self.nonfinite, "workers": world,
                   **optimizer_metrics(self.optimizer)}
        if cfg.flow.scheduled_sampling is not None:  # the global batch's mean, from the draws (no collective)
            lengths = [rollout_steps_of(cfg, step, slot) for slot in range(self.accum * world)]
            metrics["rollout_steps"] = float(torch.cat(lengths).float().mean())
        if self.peak:  # this rank's model FLOPs over its step time, against one card's peak
            metrics.update(tflops_per_s=step_flops / step_time / 1e12,
                           mfu=step_flops / step_time / (self.peak * 1e12))
        return metrics

    def evaluate(self) -> float:
        """The eval loss, the same value on every rank (all-reduced), so stop decisions agree."""
        with self.attention(), averaged_weights(self.optimizer):
            return eval_loss(self.strategy.transformer, self.eval_batches, self.cfg.flow, self.device, self.dtype,
                             batch_size=self.t.batch_size, rank=self.rank, world=self.world, autocast=self.autocast)

    def validate(self, step: int) -> dict:
        """Sample the validation prompts with the LoRA into validation/step_NNNNNN (and W&B, and the webhook);
        returns the metrics it measured (the mean `clip_score`, on rank 0, when validation.clip_score is on)."""
        cfg = self.cfg
        # Ranks that hold the whole model share the images out (1/N of the time each), unless live previews are on:
        # those are posted by rank 0 alone. Under ZeRO-3 every forward needs every rank: each samples every image.
        shared = self.world > 1 and not self.strategy.sharded_params and not cfg.validation.preview_steps
        if not cfg.validation.prompts or not (self.rank == 0 or self.strategy.sharded_params or shared):
            return {}
        self.vae = self.vae or load_vae(self.pretrained, self.device, self.dtype, cfg.model.revision)
        store = self.reader.store
        embeds = [{"prompt": v["prompt"], **store.read("text", v["text_key"])} for v in self.manifest["validation"]]
        negative_key = self.manifest["validation"][0].get("negative_key")  # validation.negative_prompt's
        uncond = store.read("text", negative_key or self.manifest["uncond_key"])
        if cfg.text.uncond == "zero" and not negative_key:
            uncond = {k: torch.zeros_like(v) for k, v in uncond.items()}
        folder = self.layout.validation_images(step)
        extras = self.validation_extras  # rank 0's
        weights = self.ema.swapped_in() if cfg.validation.use_ema else contextlib.nullcontext()
        # schedule-free samples at its average; the EMA (if used) swaps in over whichever weights
        with sampling_attention(cfg.validation.attention, self.device), averaged_weights(self.optimizer), \
                weights:
            written = sample_images(self.strategy.transformer, self.vae,
                                    load_sampler(self.pretrained, cfg.model.revision), embeds, uncond, cfg.validation,
                                    folder, self.device, save=self.rank == 0,
                                    step_callback=extras.step_callback(step) if extras else None,
                                    rank=self.rank if shared else 0, world=self.world if shared else 1)
        self.tracker.log_images(folder, step, cfg.validation.prompts)
        if extras is None:
            return {}
        extras.post_final(written, [(e["prompt"], size) for e in embeds for size in cfg.validation.sizes
                                    for _ in range(cfg.validation.num_images)], step)
        scores = extras.clip_scores(folder, cfg.validation.prompts)
        if not scores:
            return {}
        self.tracker.log_clip_scores(scores, step)
        return {"clip_score": sum(scores.values()) / len(scores)}

    def report(self, metrics: dict, with_checkpoint: bool) -> None:
        """ray.train.report, with a checkpoint when asked: rank 0's LoRA and loop state, each rank's optimizer
        shard where sharded, and a record of every rank's files (train/checkpoint.py)."""
        import ray.train

        if not with_checkpoint:
            ray.train.report(metrics)
            return

        def ema_files(folder: Path) -> None:  # rank 0's: the EMA by name, and as a LoRA beside the LoRA
            self.ema.save(folder)
            export_lora(folder, self.ema.lora_tensors(), self.cfg.lora, EMA_LORA)

        # A schedule-free optimizer's checkpoint holds its average x, and the optimizer saved in eval mode to match
        with tempfile.TemporaryDirectory() as tmp, averaged_weights(self.optimizer):
            lora = self.strategy.lora_tensors()  # a collective under ZeRO-3: every rank calls it
            has_files = write_checkpoint(Path(tmp), metrics["step"], self.rank, self.world, lora, self.cfg.lora,
                                         self.lr_schedule, {"initial_eval": self.initial_eval,
                                                            "nonfinite": self.nonfinite},
                                         self.strategy.optimizer_state, self.strategy.sharded_optimizer,
                                         ema_files if self.ema is not None else None)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
        if self.validation_extras is not None:
            self.validation_extras.close()
        if self.tracker is not None:
            self.tracker.finish()

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _log(self, metrics: dict) -> None:
        if self.log is not None:
            self.log.write(metrics)
            self.tracker.log(metrics)

    def _with_noise(self, args: tuple, batch: dict) -> dict:
        """Add its sigmas and noise to a micro-batch (Prefetcher's `then`, run in the read-ahead thread): drawn from
        the seed of its step and place in the global batch, so the stream does not depend on where it is drawn."""
        step, micro = args[0] + 1, args[1]
        slot = micro * self.world + self.rank
        seed = _step_seed(self.t.seed, step, slot)
        sigmas, noise = draw_noise(self.cfg.flow, tuple(batch["latents"].shape), torch.Generator().manual_seed(seed))
        batch = {**batch, "sigmas": sigmas, "noise": noise}
        if self.cfg.flow.scheduled_sampling is not None:
            batch["rollout_steps"] = rollout_steps_of(self.cfg, step, slot)
        return batch

    def _roll_out(self, batch: dict, latents: torch.Tensor, fb) -> torch.Tensor:
        """The micro-batch's input with scheduled sampling (flow.rolled_out_input): the current model, LoRA on, no
        gradient, in eval mode (no LoRA dropout), on the unwrapped module (no DDP hooks: these forwards reduce
        nothing). No activation is kept, so the step's memory peak stays the training forward's."""
        module = self.strategy.transformer
        prompt = batch["prompt_embeds"].to(self.device, self.dtype, non_blocking=True)
        pooled = batch["pooled"].to(self.device, self.dtype, non_blocking=True)

        def velocity(x: torch.Tensor, timesteps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return module(hidden_states=x, timestep=timesteps, encoder_hidden_states=prompt[index],
                          pooled_projections=pooled[index], return_dict=False)[0]

        shift = resolve_shift(self.cfg.flow, latents.shape[-2], latents.shape[-1])
        module.eval()
        try:
            with self.autocast:
                return rolled_out_input(velocity, latents, fb.noise, fb.noisy, batch["sigmas"],
                                        batch["rollout_steps"], shift)
        finally:
            module.train()

    def _forward(self, model, batch: dict, fb) -> torch.Tensor:
        return model(hidden_states=fb.noisy, timestep=fb.timesteps,
                     encoder_hidden_states=batch["prompt_embeds"].to(self.device, self.dtype, non_blocking=True),
                     pooled_projections=batch["pooled"].to(self.device, self.dtype, non_blocking=True),
                     return_dict=False)[0]

    def _train_flops(self, batch: dict, latents: torch.Tensor, fb) -> int:
        """F_train of one micro-batch (train/flops.py), counted once per bucket shape by an extra forward pass:
        every rank reaches a new shape at the same step (one bucket per step), as ZeRO-3's gathers need. A rollout
        (scheduled sampling) adds one forward of an item per step it rolls (the forward's FLOPs are per item)."""
        shape = tuple(latents.shape)
        if shape not in self.flops_of_shape:
            module = self.strategy.transformer
            with self.autocast:
                self.flops_of_shape[shape] = count_flops(module, lambda: self._forward(module, batch, fb),
                                                         self.device)
        count = self.flops_of_shape[shape]
        rolled = int(batch["rollout_steps"].sum()) if "rollout_steps" in batch else 0
        return count.training() + count.forward * rolled // shape[0]
