"""How the LoRA's gradients are reduced and the optimizer stepped across workers: DDP (default) or DeepSpeed.

The loop calls the same things whatever the strategy:
    wrapped(...)                   forward through the wrapper (DDP or the DeepSpeed engine); `transformer` is the
                                   bare model inside it (eval, sampling, FLOP counting)
    accumulating(sync)             context for a micro-step (no gradient all-reduce until the last one)
    backward(loss)
    step(loss) -> StepResult       clip, then step unless the loss or the gradient is not finite; the step's loss,
                                   gradient norm and whether it stepped, read from the device once
    lora_tensors()                 the adapter's tensors (models/lora.py adapter_tensors), complete on rank 0
                                   (gathered under ZeRO-3)
    optimizer_state() / load_optimizer_state(state)   weights_only-loadable; per rank when sharded_optimizer
and two flags: sharded_optimizer (each rank saves its own optimizer file) and sharded_params (ZeRO-3: a forward
pass is a collective, so eval and validation sampling must run on every rank).

Precision is the same under both: LoRA weights, gradients and their reduction in fp32, the frozen base in
model.dtype, and a bf16 autocast around the forward when train.mixed_precision is bf16 (deepspeed_config says how
DeepSpeed is told so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from raytune_sd3.config import ConfigError, JobConfig


def clip_gradients(params: list[nn.Parameter], cfg: JobConfig) -> torch.Tensor:
    """Clip by global norm (default) or by value; returns the global gradient norm before clipping."""
    t = cfg.train
    if t.grad_clip == "norm":
        return torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)
    norm = torch.nn.utils.clip_grad_norm_(params, math.inf)
    if t.max_grad_norm:
        torch.nn.utils.clip_grad_value_(params, t.max_grad_norm)
    return norm


class StepResult(NamedTuple):
    """What an optimizer step reports, as host values: the loss it was given, the gradient norm before clipping,
    and whether the update was applied (False: a non-finite loss or gradient left weights and state untouched)."""

    loss: float
    grad_norm: float
    stepped: bool


def read_step(loss: torch.Tensor, norm: torch.Tensor, finite: torch.Tensor) -> StepResult:
    """The step's three scalars in one device-to-host copy (each .item() would be a sync of its own)."""
    loss_value, norm_value, finite_value = torch.stack([loss.float(), norm.float(), finite.float()]).cpu().tolist()
    return StepResult(loss_value, norm_value, finite_value == 1.0)


def decides_skip_on_device(optimizer) -> bool:
    """Whether `optimizer` takes a `found_inf` tensor and skips its update on the device (torch's fused Adam/AdamW:
    the flag GradScaler relies on), so the host need not read the loss before the update is queued."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def clip_and_step(params: list[nn.Parameter], optimizer, loss: torch.Tensor, cfg: JobConfig) -> StepResult:
    """Clip, then update unless `loss` (0-d, equal on every rank) or the gradient norm is not finite; zero the
    gradients. One host read per step: after the update is queued where the optimizer decides the skip on the
    device, else before it."""
    norm = clip_gradients(params, cfg)  # identical on every rank after the all-reduce
    finite = torch.isfinite(loss) & torch.isfinite(norm)
    if decides_skip_on_device(optimizer):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        result = read_step(loss, norm, finite)
    else:
        result = read_step(loss, norm, finite)
        if result.stepped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def skip_frozen_sync(module: nn.Module) -> list[str]:
    """Tell DDP to leave the frozen base alone; returns the names it will skip.

    By default DDP broadcasts every parameter and buffer from rank 0 when it wraps the model (16 GB for SD3.5
    Large's frozen base) and every buffer again at each step's first forward (its pos_embed: 179 MB in bf16). Every
    rank loads the same frozen weights from the same files, so neither is needed; the LoRA parameters, the only
    trainable ones, are still broadcast once (identical anyway: seeded init) and their gradients all-reduced.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, p in module.named_parameters() if not p.requires_grad] + [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


class DDPStrategy:
    """torch DDP over the trainable (LoRA) parameters; the frozen base is replicated on every worker and never
    sent between them (skip_frozen_sync)."""

    name = "ddp"
    sharded_optimizer = False  # every rank holds the same optimizer state: rank 0 saves it, all load it
    sharded_params = False  # every rank holds the whole model: each can sample validation images alone

    def __init__(self, transformer: nn.Module, params: list[nn.Parameter], optimizer, cfg: JobConfig, world: int):
        import ray.train.torch

        self.transformer, self.params, self.optimizer, self.cfg = transformer, params, optimizer, cfg
        if world > 1:
            skip_frozen_sync(transformer)
        self.wrapped = ray.train.torch.prepare_model(transformer, parallel_strategy="ddp" if world > 1 else None)
        self.world = world

    def accumulating(self, sync: bool):
        return contextlib.nullcontext() if sync or self.world == 1 else self.wrapped.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss: torch.Tensor) -> StepResult:
        return clip_and_step(self.params, self.optimizer, loss, self.cfg)

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        from raytune_sd3.models.lora import adapter_tensors

        return adapter_tensors(self.transformer)

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


# --- DeepSpeed ZeRO ----------------------------------------------------------------------------------------------


def deepspeed_config(cfg: JobConfig, world: int) -> dict:
    """The DeepSpeed config of this job: generated from `cfg.train`, or the user's JSON with our keys on top.

    Batch size, accumulation, clipping and the ZeRO stage always come from the job (train.batch_size, grad_accum,
    max_grad_norm, strategy): the loop's data reader and LR schedule are built from them, so a JSON that said
    otherwise would silently train something else.

    Precision comes from the job too, and is DDP's: train.mixed_precision bf16 becomes DeepSpeed's `torch_autocast`
    (bf16 autocast around the forward) with no lower-precision modules, so LoRA weights, gradients and their
    reduction stay fp32; the frozen base keeps model.dtype. A JSON that enables DeepSpeed's `bf16` or `fp16` is
    refused (ConfigError): those cast the whole module, LoRA and base, to 16 bits and reduce 16-bit gradients.
    """
    t = cfg.train
    stage = {"zero2": 2, "zero3": 3}[t.strategy]
    where = "train.deepspeed_config"
    if t.deepspeed_config is not None:
        path = Path(t.deepspeed_config)
        try:
            ds = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested 10^5 deep
            raise ConfigError(f"{where}: cannot read {path} as JSON: {type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization", {}), dict):
            what = "is not a JSON object" if not isinstance(ds, dict) else "has a zero_optimization that is not an object"
            raise ConfigError(f"{where}: {path} {what}; a DeepSpeed config is an object of sections, e.g. "
                              '{"zero_optimization": {"stage": 2}}')
        for key in ("optimizer", "scheduler"):  # ours are built from train.* and stepped by the loop
            if key in ds:
                raise ConfigError(f"{where}: {path} has an '{key}' section; remove it, the optimizer and LR "
                                  "schedule come from train.optimizer, train.learning_rate and train.lr_scheduler")
        enabled = [k for k in ("bf16", "bfloat16", "fp16", "torch_autocast") if _enables(ds.get(k))]
        if enabled:
            raise ConfigError(
                f"{where}: {path} enables {' and '.join(enabled)}; remove it: mixed precision comes from "
                "train.mixed_precision (bf16: autocast around the forward, fp32 LoRA weights, gradients and gradient "
                "reduction, as under DDP) and model.dtype (bf16 for a bf16 frozen base). DeepSpeed's bf16/fp16 "
                "cast the whole model, LoRA included, to 16 bits and reduce 16-bit gradients")
        their_stage = ds.get("zero_optimization", {}).get("stage", stage)
        if their_stage != stage:
            raise ConfigError(f"{where}: {path} sets zero_optimization.stage {their_stage} but train.strategy is "
                              f"{t.strategy}; make them agree")
    else:
        ds = {"steps_per_print": 2**62, "wall_clock_breakdown": False}
    if t.mixed_precision == "bf16":
        # The engine's forward turns off an autocast entered outside it unless this is set. No module on the
        # lower-precision list: DeepSpeed would then reduce those modules' (the LoRA Linears') gradients in bf16.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    # Ours override the JSON's (see the docstring).
    ds.setdefault("zero_optimization", {})["stage"] = stage
    ds.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=t.grad_accum,
              train_batch_size=t.batch_size * t.grad_accum * world,
              gradient_clipping=t.max_grad_norm or 0.0)  # 0 = off in DeepSpeed
    # Our optimizers (train/optim.py) are torch optimizers that DeepSpeed does not list as tested with ZeRO.
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def _enables(section) -> bool:
    """Whether a DeepSpeed precision section (`{"enabled": ...}`) is on; "auto" (HF's placeholder) counts as on."""
    if isinstance(section, dict):
        return section.get("enabled", False) is not False
    return section not in (None, False)


def _no_shared_memory_op_on_cpu() -> None:
    """On DeepSpeed's CPU accelerator its communication backend compiles a shared-memory all-reduce op as it starts
    (28 s of g++ on 2 cores on each new machine, and an error where no C++ compiler is installed), though only
    DeepSpeed's inference all-reduce calls it: ZeRO's collectives go through torch.distributed (gloo) either way.
    Marked incompatible, the op is not built, as on a platform without it. DeepSpeed computes that table once per
    process and keeps edits to it (deepspeed/ops/__init__.py); GPU accelerators never build this op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedStrategy:
    """DeepSpeed ZeRO-2 (optimizer state and gradients sharded) or ZeRO-3 (also every parameter, the frozen base
    included), with our torch optimizer; our LR scheduler stays outside DeepSpeed and is stepped by the loop.

    Accumulation: DeepSpeed counts micro-steps itself and wants `engine.step()` after every backward (it updates only
    at the boundary). So `backward` steps the engine after each micro-step but the last, and `step` does the
    boundary one. The loop already divides each micro-step's loss by grad_accum, so backward passes
    `scale_wrt_gas=False` (DeepSpeed would divide again): the gradient is the mean over micro-steps and ranks, as
    under DDP.

    Precision (see deepspeed_config): as under DDP, fp32 LoRA weights, gradients and gradient reduction, bf16
    autocast around the forward when train.mixed_precision is bf16, and the frozen base in model.dtype; DeepSpeed's
    own bf16/fp16 modes are not used. One difference stays under ZeRO-3 with bf16: DeepSpeed's memory-efficient
    linear (zero_optimization.memory_efficient_linear, on by default) adds the bias after the bf16 matmul where
    torch's linear rounds once, which moves the loss by ~1e-4 and gradients by ~1e-3 (relative, tiny model); set it
    to false in train.deepspeed_config for torch's linear and DDP's numbers.

    Non-finite steps: a loss that is NaN/inf is turned into NaN gradients (`loss * nan`, no host sync), and
    DeepSpeed's own overflow check (a non-finite global gradient norm) then skips the update on every rank, zeroes
    the gradients and reports the norm as inf. So `step` returns (inf, False) for such a step, where DDP returns
    (its NaN/inf norm, False); the weights and optimizer state are untouched either way.
    """

    sharded_optimizer = True  # each rank saves and loads its own shard: optimizer_rank{R}.pt

    def __init__(self, transformer: nn.Module, params: list[nn.Parameter], optimizer, cfg: JobConfig, world: int):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # else a page of config per worker
        _no_shared_memory_op_on_cpu()
        self.name = cfg.train.strategy
        self.stage = 3 if self.name == "zero3" else 2
        # Under ZeRO-3 a forward pass gathers parameters from every rank: eval and sampling must run on all ranks.
        self.sharded_params = self.stage == 3
        self.transformer, self.params, self.world = transformer, params, world
        self.wrapped, self.optimizer, _, _ = deepspeed.initialize(
            model=transformer, optimizer=optimizer, model_parameters=params, config=deepspeed_config(cfg, world),
            dist_init_required=False)  # Ray Train has set up torch.distributed already
        self._last_micro = True

    def accumulating(self, sync: bool):
        self._last_micro = sync  # the engine reduces gradients at its own boundary; no_sync is DDP-only
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        poison = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)  # see the class docstring
        self.wrapped.backward(loss * poison, scale_wrt_gas=False)
        if not self._last_micro:
            self.wrapped.step()  # a no-op update that advances DeepSpeed's micro-step counter

    def step(self, loss: torch.Tensor) -> StepResult:
        if not self.wrapped.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's micro-step count disagrees with the loop's: accumulating(sync=True) "
                               "must mark the last micro-step of each optimizer step")
        self.wrapped.step()
        norm = self.wrapped.get_global_grad_norm()  # before clipping, over every rank's shard
        norm = math.nan if norm is None else float(norm)
        return StepResult(float(loss), norm, bool(self.wrapped.was_step_applied()))

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """peft's LoRA tensors from the optimizer's fp32 master weights, assembled from every rank's shard.

        A collective (every rank must call it), complete on every rank. The masters, not the module's copies: under
        ZeRO-3 the module's are partitioned (empty tensors on each rank), and with bf16 they are rounded.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        from raytune_sd3.models.lora import adapter_tensors

        full = {name: safe_get_full_fp32_param(p).detach().cpu()
                for name, p in self.transformer.named_parameters() if p.requires_grad}
        return adapter_tensors(self.transformer, full)

    def optimizer_state(self) -> dict:
        """This rank's ZeRO state (base optimizer's shard + fp32 master shard), in types torch.load(weights_only=True)
        accepts: DeepSpeed's own dict holds a LossScaler object, an enum and (ZeRO-2) fragment addresses."""
        state = dict(self.optimizer.state_dict())
        state.pop("param_slice_mappings", None)  # ZeRO-2: read only by DeepSpeed's universal checkpoints
        state["zero_stage"] = int(state["zero_stage"])
        state["loss_scaler"] = {k: v for k, v in vars(state["loss_scaler"]).items()
                                if type(v) in (bool, int, float)}  # scale and its counters (fp16 dynamic scaling)
        return state

    def load_optimizer_state(self, state: dict) -> None:
        """Restore what optimizer_state() gave on this rank, including the fp32 master weights, and write them
        into the model's LoRA weights (so the model holds the checkpoint's LoRA whatever was loaded into it before)."""
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils import safe_get_full_fp32_param

        state = dict(state)
        scaler = self.optimizer.loss_scaler
        for k, v in state["loss_scaler"].items():
            setattr(scaler, k, v)
        state.update(loss_scaler=scaler, zero_stage=ZeroStageEnum(state["zero_stage"]))
        # A list indexed by rank; each rank reads only its own entry.
        self.optimizer.load_state_dict([state] * self.world, load_from_fp32_weights=True)
        if self.stage == 2:  # ZeRO-3 copies masters into its parameter shards itself; ZeRO-2 does not
            with torch.no_grad():
                for p in self.params:
                    p.copy_(safe_get_full_fp32_param(p))


def make_strategy(transformer: nn.Module, params: list[nn.Parameter], optimizer, cfg: JobConfig, world: int):
    """DDPStrategy for train.strategy ddp, DeepSpeedStrategy for zero2 / zero3."""
    if cfg.train.strategy in ("zero2", "zero3"):
        return DeepSpeedStrategy(transformer, params, optimizer, cfg, world)
    return DDPStrategy(transformer, params, optimizer, cfg, world)
