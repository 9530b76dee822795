"""How a job trains (`train:`): the workers and their strategy (DDP, ZeRO), the batch and its split, the optimizer
and its schedule, precision, checkpoints and the divergence rules; with the checks the driver repeats once the
cluster has resolved `auto` (the global batch, a quantised base under a strategy and precision)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raytune_sd3.config.optimizers import OPTIMIZERS, POLYNOMIAL_LR_END
from raytune_sd3.config.section import PathText, Section

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
