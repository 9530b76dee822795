"""`train.batch_size: auto`: the largest micro-batch that fits the workers' GPU, keeping the global batch.

The user gives the global batch (`train.global_batch_size` N: images per optimizer step, which sets the
trajectory); the split into workers x micro-batch x accumulation is a matter of speed, chosen here once, on the
driver, when the job starts (driver/placement.py resolve_auto; job.yaml records it):

- a micro-batch b is allowed when each worker's share N / W (W: the largest worker count when elastic) is a
  multiple of b, and, when elastic, every count in the range shares the N / b micro-batches evenly; then
  grad_accum = N / (W x b);
- on GPUs, the largest allowed b whose memory estimate (memory.py, computed as the preflight does) stays under
  TIGHT of the card's memory; the card is Ray's `accelerator_type` of the GPU nodes (or the check's --gpu);
- on CPUs no memory limit is modelled: b = N / W, no accumulation;
- a card whose memory is unknown (or no GPU node up yet): b = 1, which fits wherever anything does, and the note
  says how to choose better.
"""

from __future__ import annotations

from collections.abc import Callable

from raytune_sd3.config import TINY_MODELS, JobConfig, TrainConfig
from raytune_sd3.hardware import GIB
from raytune_sd3.memory import MemoryEstimate, estimate
from raytune_sd3.models.catalogue import TransformerShape, transformer_config, vae_channels, vae_params

TIGHT = 0.90  # above this share of the GPU the estimate's error (~5-10%, benchmarks/RESULTS.md) can tip it over


def job_estimator(cfg: JobConfig, config: dict, model: str, strategy: str | None = None,
                  quantization: str | None = None) -> Callable[..., MemoryEstimate]:
    """estimate() for this job's settings, as a function of what may vary: micro-batch, strategy, quantization,
    gradient checkpointing. `config`: the transformer's config.json; `model`: the folder (or hub id) of its VAE."""
    t, shape = cfg.train, TransformerShape.from_config(config)
    strategy = strategy or t.strategy
    if quantization is None and cfg.model.quantize != "none":
        quantization = cfg.model.quantize
    ds0 = max(cfg.data.datasets, key=lambda d: d.max_resolution)
    val_res = max((max(w, h) for w, h in cfg.validation.sizes), default=0) if cfg.validation.prompts else 0
    vae = vae_params(model) if cfg.validation.prompts else None

    def at(batch: int, strat: str = strategy, quant: str | None = quantization,
           ckpt: bool = t.gradient_checkpointing) -> MemoryEstimate:
        return estimate(shape, dtype=cfg.model.dtype, targets=cfg.lora.targets, rank=cfg.lora.rank, batch=batch,
                        resolution=ds0.max_resolution, t5_tokens=cfg.text.t5_max_length, num_workers=t.max_workers,
                        strategy=strat, mixed_precision=t.mixed_precision, quantization=quant,
                        blocks=cfg.lora.blocks, vae_params=vae, validation_resolution=val_res,
                        vae_channels=vae_channels(model), gradient_checkpointing=ckpt, lora_dtype=cfg.lora.dtype,
                        optimizer=t.optimizer, lora_kind=cfg.lora.kind, ema=t.ema_decay is not None,
                        lokr_factor=cfg.lora.lycoris_settings.factor,
                        lokr_full_matrix=cfg.lora.lycoris_settings.full_matrix,
                        ema_sampling=cfg.validation.use_ema)

    return at


def micro_batches(t: TrainConfig) -> list[int]:
    """The micro-batches that split train.global_batch_size evenly over the workers (and, when elastic, over every
    worker count in the range), largest first; 1 is always one of them (the config checked it)."""
    n, top = t.global_batch_size, t.max_workers
    share = n // top
    counts = range(t.min_workers, top + 1)
    return [b for b in range(share, 0, -1) if share % b == 0 and all((n // b) % w == 0 for w in counts)]


def model_folder(cfg: JobConfig) -> str:
    """Where the transformer's config.json is read from (a tiny model is built offline first)."""
    if cfg.model.pretrained in TINY_MODELS:
        # imported here for start-up time: testmodels.resolve loads torch
        from raytune_sd3.testmodels.resolve import resolve_pretrained

        return resolve_pretrained(cfg.model.pretrained)
    return cfg.model.pretrained


def resolve_micro_batch(cfg: JobConfig, card: tuple[str, float] | str | None) -> str:
    """Set train.batch_size (from auto) and grad_accum for `card`: (name, GiB) of the workers' GPU, why it is not
    known (a str), or None for CPU workers. Returns the line that says what was chosen and why."""
    t = cfg.train
    n, top, options = t.global_batch_size, t.max_workers, micro_batches(t)
    if card is None:
        b, why = options[0], "CPU workers: no memory limit is modelled"
    elif isinstance(card, str):
        b, why = 1, (f"{card}; 1 is the smallest and fits wherever anything does: set train.batch_size by hand, "
                     "or see what fits a card with python -m raytune_sd3.check JOB --gpu CARD")
    else:
        b, why = _largest_that_fits(cfg, options, *card)
    t.batch_size, t.grad_accum = b, n // (top * b)
    return (f"train.batch_size auto -> {b} ({why}), grad_accum {t.grad_accum}: global batch {n} = "
            f"{top} worker{'s' * (top != 1)} x {b} x {t.grad_accum}")


def _largest_that_fits(cfg: JobConfig, options: list[int], name: str, gib: float) -> tuple[int, str]:
    try:
        model = model_folder(cfg)
        config, _ = transformer_config(model, cfg.model.revision)
    except ValueError as e:  # no config.json here: nothing to estimate from
        return 1, f"no memory estimate ({e}); set train.batch_size by hand"
    at = job_estimator(cfg, config, model)
    limit = TIGHT * gib * GIB
    for i, b in enumerate(options):
        used = at(b).total
        if used <= limit:
            over = (f"; {options[i - 1]} would need {at(options[i - 1]).total / GIB:.1f}" if i else "")
            return b, f"estimate {used / GIB:.1f} of {gib:.1f} GiB on {name}{over}"
    return 1, (f"even batch 1 is estimated at {used / GIB:.1f} of {gib:.1f} GiB on {name}: "
               "python -m raytune_sd3.check JOB says what to change")
