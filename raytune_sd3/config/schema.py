"""The job config: one typed schema, validated at the door before Ray or any model starts.

A job is a YAML file whose sections mirror the classes below (`model`, `text`, `data`, `flow`, `lora`, `train`,
`validation`, `ray`, `wandb`, `hub`); `output_dir` sits at the top level as in SimpleTuner. Every field has a one-line docstring.
Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the file and key.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_serializer, model_validator

from raytune_sd3.config.adapter import INIT_FROM_SETS, LoraConfig, adapter_problem
from raytune_sd3.config.data import DataConfig
from raytune_sd3.config.flow import FlowConfig
from raytune_sd3.config.model import ModelConfig, TextConfig
from raytune_sd3.config.optimizers import OPTIMIZERS, POLYNOMIAL_LR_END
from raytune_sd3.config.secrets import REDACTED, SECRET_KEY, remember_secret
from raytune_sd3.config.section import MAX_RESOLUTION, FolderPath, PathText, Section
from raytune_sd3.config.tune_space import check_key

OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]  # the schema's names are the registry's


class ProdigyConfig(Section):
    """Prodigy's own settings (prodigyopt; train.optimizer prodigy). Its betas, eps and weight decay are
    train.adam_beta1/adam_beta2, adam_epsilon and weight_decay (decoupled, as AdamW's)."""

    d_coef: float = Field(1.0, gt=0)
    """Scales Prodigy's estimate of the step size d: the knob its authors advise tuning (0.5-2 typical)."""
    d0: float = Field(1e-6, gt=0)
    """The starting estimate of d (rarely changed)."""
    growth_rate: float | None = Field(None, gt=1)
    """Largest factor by which d may grow per step (e.g. 1.02: a warmup of sorts); null: unlimited."""
    safeguard_warmup: bool = False
    """Leave the learning rate out of d's estimate, which keeps a warmup (train.lr_warmup_steps) from inflating it:
    advised with a warmup."""
    use_bias_correction: bool = False
    """Adam's bias correction in Prodigy's step (off in the library by default)."""


class TrainConfig(Section):
    num_workers: int | list[int] | Literal["auto"] = "auto"
    """Ray Train workers, one per GPU on a GPU cluster. auto: one per GPU the cluster has when the job starts, or 2
    CPU workers where it has none (an autoscaling cluster whose GPU nodes are not up yet: give a number).
    `[min, max]` trains elastically (DDP): Ray Train starts with as many as the cluster fits, grows or shrinks
    between min and max, and grad_accum is recomputed so the global batch stays batch_size x grad_accum x max. A
    count the cluster can never place stops the job in seconds (unless an autoscaler may add nodes)."""
    strategy: Literal["ddp", "zero2", "zero3"] = "ddp"
    """ddp (LoRA gradients all-reduced, base replicated); zero2 / zero3: DeepSpeed ZeRO stage 2 / 3 (zero3 also
    shards the frozen base across workers)."""
    deepspeed_config: PathText | None = None
    """A DeepSpeed JSON to use instead of the one generated from this job (batch sizes, clipping and precision still
    ours: one that enables DeepSpeed's bf16 or fp16 is refused, use mixed_precision)."""
    use_gpu: bool | None = None
    """Train on GPUs; default: when the Ray cluster has any."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers: PACK (fewest nodes), SPREAD (across nodes), STRICT_SPREAD (one per node)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Logical CPUs each training worker reserves."""
    batch_size: int | Literal["auto"] = 4
    """Images per worker per micro-step. auto: the largest that fits the cluster's GPU by the memory estimate (under
    the preflight's 90% margin) and divides the global batch evenly; needs global_batch_size, and sets grad_accum.
    Resolved once, when the job starts, and written into job.yaml (python -m raytune_sd3.check --gpu shows it)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps per optimizer step (with batch_size auto it is chosen: leave it out)."""
    global_batch_size: int | None = Field(None, ge=1)
    """Images per optimizer step over all workers: required with batch_size auto, which keeps it by setting
    grad_accum = global_batch_size / (workers x batch_size). With a number for batch_size it is optional and must
    equal batch_size x grad_accum x workers (the largest count when elastic)."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps to train."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["constant", "cosine", "linear", "polynomial", "cosine_with_restarts"] = "constant"
    """Schedule after warmup (diffusers' get_scheduler): constant; cosine and linear decay to 0; polynomial decays
    to 1e-7 as (1 - progress)^lr_power; cosine_with_restarts runs lr_num_cycles cosine decays, each restarting at
    the peak."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps (adamw_schedulefree: its own warmup, inside the optimizer)."""
    lr_power: float = Field(1.0, gt=0)
    """Power of the polynomial schedule (1: linear to 1e-7)."""
    lr_num_cycles: int = Field(1, ge=1)
    """Cosine decays (hard restarts) of the cosine_with_restarts schedule."""
    optimizer: OptimizerName = "adamw"
    """adamw (torch); adamw_bf16 (AdamW with stochastic rounding into bf16 weights, for lora.dtype bf16);
    stableadamw (AdamW with per-tensor update clipping); lion; adamw8bit / lion8bit (bitsandbytes, CUDA);
    adamw8bit_paged / lion8bit_paged (the same in paged memory, which CUDA may move to host RAM under pressure);
    prodigy (prodigyopt: estimates its own step size, learning_rate scales it: use 1.0; settings in
    train.prodigy); adamw_schedulefree (schedulefree: no LR schedule, it averages its iterates instead; evaluated
    and saved at the average; lr_scheduler constant, lr_warmup_steps warms it up). prodigy and adamw_schedulefree
    keep their state in the LoRA's dtype and run with train.strategy ddp."""
    prodigy: ProdigyConfig = Field(default_factory=ProdigyConfig)
    """Prodigy's settings (train.optimizer prodigy)."""
    weight_decay: float = Field(1e-2, ge=0)
    """AdamW weight decay."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW (and Lion) beta1, in [0, 1)."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """AdamW (and Lion) beta2, in [0, 1)."""
    adam_epsilon: float = Field(1e-8, gt=0)
    """AdamW epsilon, above 0."""
    gradient_checkpointing: bool = False
    """Recompute the transformer's activations in the backward pass: less memory, about a third more compute."""
    compile: bool = False
    """torch.compile each transformer block (in place; one compile serves every block of a kind); the first step of
    each bucket shape pays the compilation. Off until measured on a GPU (benchmarks/gpu.py --compile)."""
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """The attention kernel of training and eval forwards (torch's scaled_dot_product_attention backends). auto:
    torch's choice; flash, cudnn and efficient are GPU kernels, to be picked by measurement (benchmarks/gpu.py
    --attention); math is the reference one."""
    peak_tflops: float | None = Field(None, gt=0)
    """The card's dense bf16 peak in TFLOP/s, for the MFU in metrics; default: known NVIDIA cards by name (H100,
    H200, A100, L4, ...); elsewhere no MFU is logged."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip threshold; null disables clipping."""
    grad_clip: Literal["norm", "value"] = "norm"
    """Clip the global gradient norm (default) or each gradient value."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """Autocast the forward pass (training and eval loss) to bf16; LoRA weights, gradients and their all-reduce stay
    fp32 (unless lora.dtype says so), under DDP and DeepSpeed alike. auto: bf16 on GPUs, no on CPUs."""
    seed: int = 0
    """Seed of LoRA init, data order, sigmas and noise."""
    report_every: int = Field(25, ge=1)
    """Also send metrics to Ray Train (and Tune) every N steps; steps with an eval loss or a checkpoint always are.
    Each ray.train.report is a barrier across workers and waits for Ray Train's controller, which takes one
    report per health check (2 s): reporting every step would cap training at half a step per second.
    metrics.jsonl and W&B get every step regardless."""
    checkpoint_every: int = Field(50, ge=1)
    """Report a Ray Train checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept in storage."""
    max_failures: int = Field(1, ge=0)
    """Worker or node failures the run survives (restarting from the last checkpoint)."""
    eval_every: int | None = Field(None, ge=1)
    """Measure the eval loss every N steps; default: at the start and at the end only."""
    max_nonfinite_steps: int = Field(5, ge=0)
    """A step whose loss or gradient is NaN/inf is skipped and counted; after this many the run stops as diverged."""
    divergence_factor: float | None = Field(None, gt=1, allow_inf_nan=True)
    """Stop as diverged when the eval loss rises above this factor times its value before training; null (or
    .inf): never."""
    grad_norm_limit: float | None = Field(None, gt=0, allow_inf_nan=True)
    """Stop as diverged when the (unclipped) gradient norm exceeds this; null (or .inf): never."""
    prior_loss_weight: float = Field(1.0, ge=0)
    """Loss weight of samples from data sets with is_regularisation_data (diffusers' prior_loss_weight)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the LoRA weights (fp32, one copy of the LoRA's parameters on each
    worker): after each applied step ema = d x ema + (1 - d) x weights, with d = min(ema_decay, (1 + n) / (10 + n))
    at the n-th update (a warm-up, as diffusers' EMAModel, so the early average is not the random init). Saved
    beside the LoRA as pytorch_lora_weights_ema.safetensors and checkpointed; null (default): no EMA. Typical:
    0.999 for thousands of steps, 0.99 for hundreds. Not with strategy zero3."""


    @field_validator("ema_decay")
    @classmethod
    def _ema_decay(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError(f"{v} is outside (0, 1): the EMA keeps this share of itself each step; use e.g. 0.999 "
                             "(or null for no EMA)")
        return v

    @model_validator(mode="after")
    def _ema_strategy(self) -> TrainConfig:
        if self.ema_decay is not None and self.strategy == "zero3":
            raise ValueError("train.ema_decay with train.strategy zero3: ZeRO-3 partitions the LoRA weights across "
                             "workers, so no worker holds the weights the EMA averages; use train.strategy zero2 "
                             "or ddp, or remove ema_decay")
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML 1.1 reads a bare `no` (as in --set train.mixed_precision=no) as false

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | list[int] | str) -> int | list[int] | str:
        if v == "auto":
            return v
        if isinstance(v, int):
            if v < 1:
                raise ValueError("must be at least 1")
            return v
        if len(v) != 2 or not 1 <= v[0] <= v[1]:
            raise ValueError(f"an elastic range is [min, max] with 1 <= min <= max, got {v}")
        return v[0] if v[0] == v[1] else v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError("must be at least 1 (or auto, with train.global_batch_size)")
        return v

    @model_validator(mode="after")
    def _global_batch(self) -> TrainConfig:
        n = self.global_batch_size
        if self.batch_size == "auto":
            if n is None:
                raise ValueError("train.batch_size auto keeps a global batch that you give: set "
                                 "train.global_batch_size (images per optimizer step over all workers, e.g. 12), or "
                                 "give train.batch_size a number")
            if self.grad_accum != 1:  # 1, the default, is what an unresolved job's dump holds (a Tune trial's)
                raise ValueError(f"train.grad_accum {self.grad_accum}: with train.batch_size auto it is chosen "
                                 "(global_batch_size / (workers x batch_size)): leave it out, or give "
                                 "train.batch_size a number")
        if n is not None and self.num_workers != "auto":
            check_global_batch(self)
        return self

    @model_validator(mode="after")
    def _optimizer(self) -> TrainConfig:
        facts = OPTIMIZERS[self.optimizer]
        if facts.schedule_free and self.lr_scheduler != "constant":
            raise ValueError(f"train.lr_scheduler {self.lr_scheduler}: train.optimizer {self.optimizer} replaces the "
                             "LR schedule (it averages its iterates instead); set train.lr_scheduler: constant "
                             "(train.lr_warmup_steps still warms it up)")
        if facts.not_under_zero and self.strategy != "ddp":
            raise ValueError(f"train.optimizer {self.optimizer} does not run under train.strategy {self.strategy}: "
                             f"{facts.not_under_zero}; use train.strategy: ddp, or another optimizer")
        if self.optimizer == "prodigy" and self.learning_rate < 0.1:
            raise ValueError(f"train.learning_rate {self.learning_rate:g} with train.optimizer prodigy: Prodigy "
                             "estimates its own step size and the learning rate only scales it; set "
                             "train.learning_rate: 1.0 (its authors' default; tune train.prodigy.d_coef instead)")
        if self.lr_scheduler == "polynomial" and self.learning_rate <= POLYNOMIAL_LR_END:
            raise ValueError(f"train.learning_rate {self.learning_rate:g}: the polynomial schedule decays to "
                             f"{POLYNOMIAL_LR_END:g} and needs a learning rate above it")
        return self

    @model_validator(mode="after")
    def _elastic(self) -> TrainConfig:
        if not self.elastic:
            return self
        if self.strategy != "ddp":
            raise ValueError(f"train.num_workers {self.num_workers} (elastic) works with train.strategy ddp only: "
                             "ZeRO's optimizer state is sharded per worker and cannot be resumed on another count")
        if self.batch_size == "auto":
            return self  # check_global_batch: batch 1 must share on every count; auto picks one that does
        per_step = self.grad_accum * self.max_workers
        bad = [w for w in range(self.min_workers, self.max_workers + 1) if per_step % w]
        if bad:
            raise ValueError(
                f"train.num_workers {self.num_workers}: the global batch holds {per_step} micro-batches "
                f"(grad_accum {self.grad_accum} x {self.max_workers} workers), which {bad} worker(s) cannot share "
                "evenly; raise grad_accum or narrow the range so every count in it divides that number")
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    def _counted(self) -> int | list[int]:
        if self.num_workers == "auto":  # a bug of ours, not the user's: the driver resolves auto first
            raise RuntimeError("train.num_workers is still 'auto': resolve it against the cluster first "
                               "(raytune_sd3.driver.placement.resolve_auto)")
        return self.num_workers

    @property
    def min_workers(self) -> int:
        n = self._counted()
        return n[0] if isinstance(n, list) else n

    @property
    def max_workers(self) -> int:
        n = self._counted()
        return n[1] if isinstance(n, list) else n

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step (fixed, also when elastic): batch_size x grad_accum x the largest worker count
        (global_batch_size while batch_size is still auto)."""
        if self.batch_size == "auto":
            return self.global_batch_size  # type: ignore[return-value]  # required with auto
        return self.batch_size * self.grad_accum * self.max_workers

    def accum_for(self, world: int) -> int:
        """Micro-steps per optimizer step with `world` workers: the global batch is fixed by the largest size."""
        return self.grad_accum * self.max_workers // world if self.elastic else self.grad_accum


def check_global_batch(t: TrainConfig) -> None:
    """train.global_batch_size against the (resolved) worker count: every worker trains the same images per step;
    with a number for batch_size it must be batch_size x grad_accum x workers. Raises ValueError naming the fix."""
    n, top = t.global_batch_size, t.max_workers
    if n is None:
        return
    counts = range(t.min_workers, top + 1)
    bad = [w for w in counts if n % w]
    if bad and t.batch_size == "auto":
        step = math.lcm(*counts)
        raise ValueError(f"train.global_batch_size {n} cannot be shared evenly by {bad} worker(s) "
                         f"(train.num_workers {t.num_workers}): every worker trains the same number of images per "
                         f"step; use a multiple of {step}, e.g. --set train.global_batch_size={-(-n // step) * step}")
    if t.batch_size != "auto" and n != t.global_batch:
        raise ValueError(f"train.global_batch_size {n} is not train.batch_size x grad_accum x workers = "
                         f"{t.batch_size} x {t.grad_accum} x {top} = {t.global_batch}: fix one, leave "
                         "global_batch_size out, or set train.batch_size: auto to choose the split")


class Domain(Section):
    """One search dimension; exactly one of its fields is set."""

    loguniform: tuple[float, float] | None = None
    """[low, high]: sampled uniformly in log space (learning rates, norms); low > 0."""
    uniform: tuple[float, float] | None = None
    """[low, high]: sampled uniformly."""
    choice: list[Any] | None = None
    """Values picked at random (random/optuna/hyperopt) or all crossed (grid), e.g. [1.0, 3.0, auto]."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        set_ = [k for k in ("loguniform", "uniform", "choice") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"a search dimension is one of loguniform: [lo, hi], uniform: [lo, hi] or "
                             f"choice: [...]; got {set_ or 'none'}")
        for k in ("loguniform", "uniform"):
            bounds = getattr(self, k)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{k}: low must be below high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {self.loguniform[0]}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: needs at least one value")
        return self

    @model_serializer(mode="wrap")
    def _only_the_set_field(self, handler):
        # The dump (job.yaml) reads like the input: {choice: [...]}, not three keys, two of them null.
        return {k: v for k, v in handler(self).items() if v is not None}

    def contains(self, value: Any) -> bool:
        if self.choice is not None:
            return value in self.choice
        lo, hi = self.loguniform or self.uniform
        return isinstance(value, int | float) and lo <= value <= hi

    def values_to_check(self) -> list[Any]:
        """The values a trial may get at the edges of this dimension (validated against the job up front)."""
        return list(self.choice if self.choice is not None else (self.loguniform or self.uniform))


class SchedulerConfig(Section):
    type: Literal["asha", "none"] = "asha"
    """`asha`: stop the worse trials early at rungs grace_period, x reduction_factor, ...; `none`: run all to max_steps."""
    grace_period: int = Field(10, ge=1)
    """Steps every trial trains before ASHA may stop it (at least train.eval_every)."""
    reduction_factor: float = Field(2.0, gt=1)
    """ASHA keeps about 1/reduction_factor of the trials at each rung."""


class TuneConfig(Section):
    num_trials: int | None = Field(None, ge=1)
    """Trials sampled from `space` after the explicit `trials` (random/optuna/hyperopt); unset for grid."""
    metric: Literal["eval_loss"] = "eval_loss"
    """What ASHA and the searcher minimise: the eval loss (fixed sigmas and noise on held-out items)."""
    search: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    """`random` samples `space`; `grid` crosses its choice lists; optuna/hyperopt when installed (pip install ...)."""
    seed: int | None = 0
    """Seed of the searcher (the same study samples the same trials); null: a different draw each time."""
    space: dict[str, Domain] = Field(default_factory=dict)
    """Dotted job key -> search dimension, e.g. train.learning_rate: {loguniform: [5.0e-6, 1.0e-4]}."""
    trials: list[dict[str, Any]] = Field(default_factory=list)
    """Explicit trials run first, each a dict of dotted job key -> value; keys a trial does not set keep the job's
    value (not sampled)."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    """Early stopping of trials on the eval loss."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials at once; default: the cluster's GPUs (CPUs on a CPU cluster) / the workers of one trial."""

    @field_validator("space")
    @classmethod
    def _space_keys(cls, v: dict[str, Domain]) -> dict[str, Domain]:
        for key in v:
            check_key(key, JobConfig)
        return v

    @field_validator("trials")
    @classmethod
    def _trial_keys(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for point in v:
            if not point:
                raise ValueError("an explicit trial needs at least one key, e.g. {train.learning_rate: 1.0e-4}")
            for key in point:
                check_key(key, JobConfig)
        return v

    @model_validator(mode="after")
    def _combinations(self) -> TuneConfig:
        if self.search == "grid":
            continuous = [k for k, d in self.space.items() if d.choice is None]
            if continuous:
                raise ValueError(f"search: grid crosses choice lists; {', '.join(continuous)} is a range "
                                 "(use choice: [...] or search: random)")
            if self.num_trials is not None or self.trials:
                raise ValueError("search: grid runs every combination of `space` once: leave num_trials and "
                                 "trials unset (or use search: random)")
            if not self.space:
                raise ValueError("search: grid needs a `space`")
        else:
            if self.space and self.num_trials is None:
                raise ValueError("num_trials: how many trials to sample from `space` (e.g. 8)")
            if self.num_trials and not self.space:
                raise ValueError("num_trials samples from `space`, which is empty (list explicit `trials` instead)")
            if not self.space and not self.trials:
                raise ValueError("a study needs a `space` (with num_trials) or a list of `trials`")
        if self.search in ("optuna", "hyperopt"):
            extra = sorted({k for point in self.trials for k in point} - set(self.space))
            if extra:
                raise ValueError(f"search: {self.search} takes explicit trials only over keys of `space`; "
                                 f"{', '.join(extra)} is not in it")
        return self

    @property
    def total_trials(self) -> int | None:
        """Trials in the study (None for grid: the number of combinations)."""
        return None if self.search == "grid" else len(self.trials) + (self.num_trials or 0)

    @property
    def keys(self) -> list[str]:
        """Every key that may differ between trials, space keys first."""
        keys = list(self.space)
        keys += [k for point in self.trials for k in point if k not in keys]
        return list(dict.fromkeys(keys))


class ValidationConfig(Section):
    prompts: list[str] = Field(default_factory=list)
    """Prompts sampled with the trained LoRA; empty disables validation images."""
    every_steps: int | None = Field(None, ge=1)
    """Also sample every N steps; default: only at the end."""
    resolution: str = "1024x1024"
    """Comma-separated WxH list, e.g. `1024x1024,1280x768`."""
    guidance: float = Field(4.0, ge=0)
    """Classifier-free guidance scale (SD3 prefers low values)."""
    steps: int = Field(28, ge=1)
    """Sampling steps."""
    seed: int = 0
    """Seed of the initial noise."""
    num_images: int = Field(1, ge=1, le=64)
    """Images per prompt and resolution, each from its own seed (validation.seed + k): NN_WxH.png for the first,
    NN_WxH_k.png for the k-th after it."""
    negative_prompt: str | None = None
    """The negative prompt of classifier-free guidance (encoded into the cache with the prompts); default: the
    unconditional embedding of text.uncond."""
    use_ema: bool = False
    """Sample the validation images with the EMA weights (train.ema_decay) instead of the trained ones; the eval
    loss stays the trained weights'."""
    skip_layers: list[int] | None = None
    """Skip-layer guidance: transformer blocks skipped in the extra pass (SD3.5: [7, 8, 9]); null disables SLG."""
    skip_layer_start: float = Field(0.01, ge=0, le=1)
    """Fraction of the steps where SLG starts."""
    skip_layer_stop: float = Field(0.2, ge=0, le=1)
    """Fraction of the steps where SLG stops."""
    skip_layer_scale: float = 2.8
    """SLG scale."""
    attention: Literal["auto", "sage"] = "auto"
    """The sampler's attention kernel: auto (torch's choice) or sage (SageAttention's 8-bit kernel, CUDA only, where
    the sageattention package is installed: faster sampling, images a little different from auto's)."""
    clip_score: bool = False
    """Score each validation image against its prompt with CLIP (100 x max(cosine, 0), as torchmetrics' CLIPScore):
    the mean goes into metrics.jsonl as `clip_score`, each prompt's into W&B, both into curves.png."""
    clip_model: str | None = None
    """CLIP model for clip_score: a hub id in the local HF cache or a folder; default openai/clip-vit-large-patch14
    (a tiny random CLIP, built offline, when model.pretrained is a tiny pipeline). Never downloaded by a run."""
    preview_steps: int | None = Field(None, ge=1)
    """Live previews: every N sampler steps decode the latents with a Tiny AutoEncoder and post the PNG to
    webhook_url (in a background thread; a failing webhook never stops training); null: no previews."""
    preview_model: str | None = None
    """Tiny AutoEncoder (diffusers AutoencoderTiny) for previews: a hub id in the local HF cache or a folder; default
    madebyollin/taesd3 (a tiny random one, built offline, when model.pretrained is a tiny pipeline)."""
    webhook_url: str | None = None
    """Discord-style webhook (multipart POST: payload_json + files[0]) that gets the previews and each validation
    step's final images. It holds a token: never written to job.yaml, logs or errors (pass it again with --set)."""

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v == REDACTED:
            raise ValueError("the URL was redacted when this job.yaml was written (it holds a token); give it again "
                             "with --set validation.webhook_url=https://...")
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as https://discord.com/api/webhooks/ID/TOKEN")
        remember_secret(v)  # from now on redact() strips it from anything this process writes
        return v

    @field_validator("resolution")
    @classmethod
    def _sizes(cls, v: str) -> str:
        parse_resolutions(v)
        return v

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return parse_resolutions(self.resolution)


class WandbConfig(Section):
    project: str | None = None
    """Weights & Biases project; null (default): no W&B. metrics.jsonl and validation PNGs are written either way."""
    entity: str | None = None
    """W&B team or user; default: the key's default entity."""
    mode: Literal["online", "offline"] = "online"
    """online needs WANDB_API_KEY on every node; offline writes under output_dir/wandb, for `wandb sync` later."""
    group: str | None = None
    """Groups runs in the W&B UI; a Tune study sets it to the study's name."""
    name: str | None = None
    """Run name; default: the job's run name (a Tune trial: its trial id)."""
    tags: list[str] = Field(default_factory=list)
    """W&B tags."""
    log_images: bool = True
    """Also send the validation images."""


class RayConfig(Section):
    address: str | None = None
    """Cluster to join; default: RAY_ADDRESS, else a local Ray started by the job."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of a local Ray; default 2x the cores (so Data, Train and Tune do not wait on each other)."""
    autoscaling: bool | None = None
    """Whether the cluster may add nodes while the job waits for its workers. true: a job asking for more than the
    cluster has waits (saying every 30 s what for); false: it stops in seconds naming what fits. Default: false
    for a local Ray and a cluster started by hand (`ray start`), true for a cluster with an autoscaler (the
    cluster launcher's files in cluster/, KubeRay with autoscaling)."""


HF_TOKEN_ENV = "HF_TOKEN"


class HubConfig(Section):
    repo_id: str | None = None
    """Hugging Face Hub model repo (`owner/name`, or `name` under the token's account) that the LoRA, its model card
    and validation images are uploaded to after training; null (default): no upload (the card is still written to
    output_dir). The token comes from the HF_TOKEN environment variable only, never from the job file."""
    private: bool = True
    """Create the repo private (default); false makes a new repo public (an existing repo keeps its visibility)."""
    trigger: str | None = None
    """The word or phrase that calls up what the LoRA learned, shown in the model card; default: the data sets'
    instance_prompt, if they have one."""

    @model_validator(mode="before")
    @classmethod
    def _no_token_here(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for key in raw:
                if SECRET_KEY.search(str(key)):
                    raise ValueError(f"hub.{key}: a Hub token is never read from the job file (it would end up in "
                                     f"logs and copies of the job); remove it and set {HF_TOKEN_ENV} in the "
                                     "environment instead")
        return raw

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"([A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}", v):
            raise ValueError(f"repo_id is `owner/name` or `name` (letters, digits, -, _ and .), e.g. "
                             f"me/sd35-my-lora, got {v!r}")
        return v


class JobConfig(Section):
    output_dir: FolderPath
    """Where this run writes job.yaml, metrics.jsonl, validation images and the LoRA (shared storage on clusters)."""
    name: str | None = None
    """Run name in Ray Train storage; default: output_dir's folder name."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    data: DataConfig
    flow: FlowConfig = Field(default_factory=FlowConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    tune: TuneConfig | None = None
    """A Ray Tune stability study (search space, scheduler): python -m raytune_sd3.tune."""

    @model_validator(mode="after")
    def _combinations(self) -> JobConfig:
        if self.train.lr_warmup_steps >= self.train.max_steps and self.train.lr_warmup_steps > 0:
            raise ValueError(
                f"train.lr_warmup_steps ({self.train.lr_warmup_steps}) must be below train.max_steps "
                f"({self.train.max_steps})"
            )
        ids = [d.id for d in self.data.datasets]
        if len(set(ids)) != len(ids):
            raise ValueError(f"data.datasets ids must be unique, got {ids}")
        if self.train.strategy != "ddp" and self.train.grad_clip == "value":
            raise ValueError("train.grad_clip 'value' works with train.strategy ddp only (ZeRO clips by norm)")
        if self.validation.skip_layers is not None and self.validation.skip_layer_start >= self.validation.skip_layer_stop:
            raise ValueError("validation.skip_layer_start must be below validation.skip_layer_stop")
        if self.validation.use_ema and self.train.ema_decay is None:
            raise ValueError("validation.use_ema samples with the EMA of the LoRA, which train.ema_decay keeps: set "
                             "train.ema_decay (e.g. 0.999), or remove use_ema")
        if self.validation.preview_steps is not None and self.validation.webhook_url is None:
            raise ValueError("validation.preview_steps needs validation.webhook_url (the previews are posted there); "
                             "set it, or remove preview_steps")
        if (problem := quantised_base_problem(self.model.quantize, self.model.dtype, self.train.strategy,
                                              self.train.mixed_precision)) is not None:
            raise ValueError(problem)
        if (problem := adapter_problem(self.lora.kind, self.train.strategy)) is not None:
            raise ValueError(problem)
        if self.flow.scheduled_sampling is not None and self.train.strategy == "zero3":
            raise ValueError("flow.scheduled_sampling with train.strategy zero3 cannot train: each worker rolls out "
                             "its own items a different number of forward passes, and every ZeRO-3 forward is a "
                             "collective of all workers (they would wait on each other for ever); use "
                             "train.strategy zero2 or ddp, or remove scheduled_sampling")
        if self.lora.init_from is not None and self.tune is not None:
            searched = sorted({k for k in [*self.tune.space, *(k for t in self.tune.trials for k in t)]
                               if k.split(".")[0] == "lora" and k.split(".")[-1] in INIT_FROM_SETS})
            if searched:
                raise ValueError(f"tune searches {', '.join(searched)}, which lora.init_from takes from its file: "
                                 "search other keys, or remove lora.init_from")
        return self

    @property
    def run_name(self) -> str:
        return self.name or Path(self.output_dir).name

    @property
    def cache_dir(self) -> str:
        """A local folder (absolute) or a URI."""
        return self.data.cache_dir or str(Path(self.output_dir) / "cache")


QUANTO_KINDS = ("int8", "int4", "int2", "fp8")  # model.quantize kinds made by optimum-quanto


def quantised_base_problem(quantize: str, dtype: str, strategy: str, mixed_precision: str) -> str | None:
    """Why a base quantised as `quantize` cannot train with this strategy and precision, or None (the job config
    checks it at the door and once `auto`s resolve; the preflight for its what-ifs).

    optimum-quanto's weights refuse DeepSpeed's tensor swap when it moves the model, and keep the dtype they were
    quantised from: under bf16 autocast an fp32 or fp16 base stops at its first step (quanto's CPU matmul rejects
    the mix; its weights refuse autocast's bf16 cast in backward).
    """
    if quantize in QUANTO_KINDS and strategy != "ddp":
        return (f"model.quantize {quantize} with train.strategy {strategy} cannot train: DeepSpeed moves the "
                "model with a tensor swap that optimum-quanto's weights refuse (the run would stop before its first "
                "step); use train.strategy: ddp, which also reduces only the LoRA's gradients")
    if quantize in QUANTO_KINDS and mixed_precision == "bf16" and dtype in ("fp32", "fp16"):
        return (f"model.quantize {quantize} with model.dtype {dtype} under train.mixed_precision bf16 cannot "
                f"train: optimum-quanto's {dtype} weights do not run under bf16 autocast (the run would stop at its "
                "first step); set model.dtype: bf16 (auto gives it on GPUs), or train.mixed_precision: no")
    return None


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """`"1024x1024,1280x768"` -> [(1024, 1024), (1280, 768)] as (width, height); each side a multiple of 16."""
    sizes = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:x(\d+))?\s*", part)
        if not m:
            raise ValueError(f"resolution {part!r} is not WxH (e.g. 1024x1024)")
        w, h = int(m.group(1)), int(m.group(2) or m.group(1))
        if not (16 <= w <= MAX_RESOLUTION and 16 <= h <= MAX_RESOLUTION):
            raise ValueError(f"resolution {part.strip()[:40]!r}: each side is 16 to {MAX_RESOLUTION} pixels "
                             "(MAX_RESOLUTION)")
        if w % 16 or h % 16:
            raise ValueError(f"resolution {w}x{h}: both sides must be multiples of 16")
        sizes.append((w, h))
    return sizes
