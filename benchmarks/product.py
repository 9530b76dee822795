"""The product's own training loop on a shaped pipeline, for gpu.py's side-by-side with its bare step.

`product_step` builds (or reuses) a pipeline whose transformer has the bare step's architecture
(raytune_sd3.testmodels.shaped), caches a demo data set at the step's resolution and T5 length through the CLI's own
path (`prepare_data`), then fits the CLI's TorchTrainer with one worker (`run_job`) for warmup + steps (+ profile,
profiled in the worker after the timed ones) + 1 steps:
the same batch, LoRA rank and targets, base dtype, autocast, AdamW and clipping as gpu.py's Trainer. Its figures
are the loop's own: step_time_s from metrics.jsonl (data read, forward, backward, clip, AdamW, LR step) and step to
step (the above plus metrics.jsonl and ray.train.report), medians over the same steps gpu.py times, the warmup and
the last (checkpoint) step left out; MFU is the loop's own metric where the card's peak is known. Also the fit's
start on rank 0 (JobRun.startup: workers start, model load, setup, first step) with a warm cache: on a Large-shaped
pipeline, the start-up a real SD3.5 Large run pays.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from common import PROFILE_ENV, bench_job, median, prepare, run_job


def product_overrides(spec_name: str, resolution: int, batch: int, args) -> list[str]:
    """--set values that make jobs/tiny.yaml train like gpu.py's Trainer on the shaped pipeline."""
    # warmup, timed steps, then the profiled ones (profiler.py; not timed), and the last, which writes the checkpoint
    steps = args.warmup + args.steps + args.profile + 1
    images = max(4 * batch, 8)  # one bucket; enough for several distinct batches
    sets = [f"data.datasets.0.resolution={resolution}", f"data.datasets.0.demo_images={images}",
            "data.caption_dropout=0", f"text.t5_max_length={args.t5_tokens}", "flow.shift=1.0",
            f"lora.rank={args.rank}", f"lora.targets={args.targets}", "train.num_workers=1",
            f"train.batch_size={batch}", "train.grad_accum=1", f"train.max_steps={steps}",
            "train.learning_rate=1e-4", "train.lr_scheduler=constant", "train.max_grad_norm=1.0",
            f"train.optimizer={args.optimizer}", f"model.quantize={args.quantize}",
            f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
            "train.report_every=1000000"]
    sets += [f"train.compile={str(args.compile).lower()}", f"train.attention={args.attention}"]
    if args.peak_tflops:
        sets.append(f"train.peak_tflops={args.peak_tflops}")
    if args.cpu_smoke:  # the bare step runs fp32 without autocast on the CPU
        sets += ["model.dtype=fp32", "train.mixed_precision=no"]
    else:
        sets += ["model.dtype=bf16", "train.mixed_precision=bf16"]
    return sets


def product_step(spec: dict, spec_name: str, resolution: int, batch: int, args, workdir: Path) -> dict:
    """Fit the product's loop on a pipeline of transformer config `spec`; its step figures (seconds, images/s,
    MFU where the peak is known)."""
    from raytune_sd3.testmodels.shaped import build_shaped_pipeline

    pipeline = build_shaped_pipeline(workdir / f"pipeline-{spec_name}-{spec['num_layers']}x{spec['num_attention_heads']}",
                                     spec, device="cpu" if args.cpu_smoke else None)
    run_dir = workdir / f"{spec_name}-{resolution}-{batch}"
    overrides = [f"model.pretrained={pipeline}", *product_overrides(spec_name, resolution, batch, args)]
    prepared = bench_job(run_dir, overrides)
    shutil.rmtree(prepared.output_dir, ignore_errors=True)  # a fit would resume from an earlier run's checkpoint
    if args.profile:  # read by the workers' timed_train_loop: Ray is started below, in this environment
        os.environ[PROFILE_ENV] = f"{args.warmup + args.steps + 1},{args.profile}"
    t0 = time.time()
    manifest, pretrained = prepare(prepared)  # Ray start and the caching of the demo images (once per run_dir)
    prepare_s = time.time() - t0
    run = run_job(prepared, manifest, pretrained)
    in_step, periods = run.in_step(args.warmup)[:args.steps], run.periods(args.warmup)[:args.steps]
    mfus = [m["mfu"] for m in run.metrics if "mfu" in m][args.warmup:args.warmup + args.steps]
    step_s = median(in_step)
    return {"product_step_s": step_s, "product_period_s": median(periods), "product_images_per_s": batch / step_s,
            "product_mfu": median(mfus) if mfus else None, "product_steps_timed": len(in_step),
            "product_step_times": in_step, "product_prepare_s": prepare_s, "product_startup": run.startup(),
            "product_profile": run.ranks[0].get("profile")}
