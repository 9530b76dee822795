"""The optimizers named by `train.optimizer`, built by `make_optimizer(params, train_config)`.

    adamw                torch.optim.AdamW (fused when every param is on CUDA)
    adamw_bf16           AdamW for bf16 weights: fp32 moments and math, stochastic rounding back into bf16
    stableadamw          AdamW with per-tensor update clipping (Wortsman et al. 2023)
    lion                 Lion (Chen et al. 2023): the sign of an interpolated momentum
    adamw8bit, lion8bit  bitsandbytes (CUDA only): 8-bit moments, blockwise-quantised
    adamw8bit_paged,     the same with their state in CUDA paged (unified) memory, which the driver moves to host
    lion8bit_paged       RAM when the GPU runs short, instead of failing with out-of-memory (SimpleTuner's
                         bnb-*-paged); the update is the unpaged one's
    prodigy              prodigyopt's Prodigy (Mishchenko and Defazio 2023): Adam whose step size d it estimates itself;
                         learning_rate scales d (1.0), train.prodigy holds its settings
    adamw_schedulefree   schedulefree's AdamWScheduleFree (Defazio et al. 2024): no LR schedule; it trains at a point
                         y between its SGD-like sequence z and their running average x, and x is the model: eval
                         loss, validation and checkpoints run inside `averaged_weights`, which puts x in the params

The names and what is known of each (state size, package, CUDA) are config.OPTIMIZERS, the one registry; BUILDERS
below builds each of its names.

The custom optimizers share one rule for dtypes: a bf16 param is updated in an fp32 copy and written back with
stochastic rounding; any other param is updated in place in its own dtype, as torch's optimizers do.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.optim import Optimizer

from raytune_sd3.config import TrainConfig

BNB_FIX = "pip install bitsandbytes on a CUDA machine, or use train.optimizer: adamw"

Params = list[torch.nn.Parameter]


def _adamw_args(t: TrainConfig) -> dict[str, Any]:
    return dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                weight_decay=t.weight_decay)


def _lion_args(t: TrainConfig) -> dict[str, Any]:
    return dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)


def _torch_adamw(params: Params, t: TrainConfig) -> Optimizer:
    fused = True if params and all(p.is_cuda for p in params) else None  # fused: one kernel for all tensors
    return torch.optim.AdamW(params, **_adamw_args(t), fused=fused)


def _prodigy(params: Params, t: TrainConfig) -> Optimizer:
    from prodigyopt import Prodigy  # imported when chosen: an optional import path of a dependency

    p = t.prodigy
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" on every worker
        return Prodigy(params, **_adamw_args(t), decouple=True, d_coef=p.d_coef, d0=p.d0,
                       growth_rate=p.growth_rate if p.growth_rate is not None else float("inf"),
                       safeguard_warmup=p.safeguard_warmup, use_bias_correction=p.use_bias_correction)


def _schedule_free(params: Params, t: TrainConfig) -> Optimizer:
    from schedulefree import AdamWScheduleFree

    # The warmup is the optimizer's own (make_lr_schedule keeps the schedule flat), as schedulefree advises: its
    # average weighs each step by the peak lr so far, and it ramps from the first step where diffusers' ramp
    # starts at 0.
    return AdamWScheduleFree(params, **_adamw_args(t), warmup_steps=t.lr_warmup_steps)


def _bnb(cls: str, args: Callable[[TrainConfig], dict[str, Any]]) -> Callable[[Params, TrainConfig], Optimizer]:
    def build(params: Params, t: TrainConfig) -> Optimizer:
        return getattr(_bitsandbytes(t.optimizer).optim, cls)(params, **args(t))
    return build


# One builder per name of config.OPTIMIZERS (tests/test_optim.py checks that the two agree).
BUILDERS: dict[str, Callable[[Params, TrainConfig], Optimizer]] = {
    "adamw": _torch_adamw,
    "adamw_bf16": lambda params, t: AdamWBF16(params, **_adamw_args(t), seed=t.seed),
    "stableadamw": lambda params, t: StableAdamW(params, **_adamw_args(t), seed=t.seed),
    "lion": lambda params, t: Lion(params, **_lion_args(t), seed=t.seed),
    "adamw8bit": _bnb("AdamW8bit", _adamw_args),
    "lion8bit": _bnb("Lion8bit", _lion_args),
    "adamw8bit_paged": _bnb("PagedAdamW8bit", _adamw_args),
    "lion8bit_paged": _bnb("PagedLion8bit", _lion_args),
    "prodigy": _prodigy,
    "adamw_schedulefree": _schedule_free,
}


def make_optimizer(params: Iterable[torch.nn.Parameter], t: TrainConfig) -> Optimizer:
    """The optimizer `t.optimizer` over `params`, with lr, betas, eps and weight decay from `t` (seed: t.seed)."""
    if t.optimizer not in BUILDERS:
        raise ValueError(f"train.optimizer: no builder for {t.optimizer!r} (train/optim.py BUILDERS)")
    return BUILDERS[t.optimizer](list(params), t)


def is_schedule_free(optimizer: Optimizer) -> bool:
    """Whether `optimizer` trains at one point and evaluates at another (schedulefree's train()/eval() switch)."""
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


def start_training(optimizer: Optimizer) -> None:
    """Before the first step (fresh or resumed): a schedule-free optimizer into train mode. A resumed one was saved
    in eval mode, its params holding the average x: this moves them back to the training point y."""
    if is_schedule_free(optimizer):
        optimizer.train()


@contextlib.contextmanager
def averaged_weights(optimizer: Optimizer) -> Iterator[None]:
    """Inside: the params hold the weights to measure and save. For a schedule-free optimizer that is the average x
    (eval mode), and the training point y again after; nested uses switch once. Others: their weights as they are."""
    switch = is_schedule_free(optimizer) and optimizer.param_groups[0]["train_mode"]
    if switch:
        optimizer.eval()
    try:
        yield
    finally:
        if switch:
            optimizer.train()


def applied_lr(optimizer: Optimizer, scheduled: float) -> float:
    """The learning rate the next step applies: the schedule's, times schedule-free's own warmup ramp."""
    group = optimizer.param_groups[0]
    warmup = group.get("warmup_steps", 0) if is_schedule_free(optimizer) else 0
    return scheduled * min(1.0, (group["k"] + 1) / warmup) if warmup else scheduled


def optimizer_metrics(optimizer: Optimizer) -> dict[str, float]:
    """What an optimizer adapts by itself, for metrics.jsonl: Prodigy's step size d."""
    group = optimizer.param_groups[0]
    return {"prodigy_d": float(group["d"])} if "d_coef" in group else {}


def _bitsandbytes(name: str) -> Any:
    """The bitsandbytes module, or a RuntimeError naming the option and the fix."""
    try:
        import bitsandbytes
    except ImportError:
        raise RuntimeError(f"train.optimizer: {name} needs bitsandbytes, which is not installed: {BNB_FIX}") from None
    if not torch.cuda.is_available():
        raise RuntimeError(f"train.optimizer: {name} needs bitsandbytes on CUDA, and no GPU is visible: {BNB_FIX}")
    return bitsandbytes


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """Write fp32 `value` into bf16 `target` (same shape), rounding up with probability = the fraction dropped.

    bf16 is fp32 without the low 16 mantissa bits. Adding uniform noise in [0, 2^16) to those bits and then clearing
    them rounds |x| up with probability (low bits) / 2^16, so E[round(x)] = x: unbiased.
    """
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    bits = (value.view(torch.int32) + noise).bitwise_and_(-65536)  # -65536 = 0xFFFF0000: keep sign, exp, 7 bits
    target.copy_(bits.view(torch.float32))  # exact: the value is now representable in bf16


def _evaluate(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _RoundingOptimizer(Optimizer):
    """Base of the optimizers below: bf16 params get fp32 math and stochastic rounding, others in-place math.

    The rounding noise comes from one torch.Generator per device, seeded with `seed`: the same seed on every DDP rank
    keeps the replicas identical, and the generators' states travel in state_dict() (key "rng") so that a resumed
    run draws the same bits as an uninterrupted one.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], defaults: dict[str, Any], seed: int):
        if defaults["lr"] < 0 or defaults["weight_decay"] < 0 or not all(0 <= b < 1 for b in defaults["betas"]):
            raise ValueError(f"{type(self).__name__}: need lr >= 0, weight_decay >= 0, 0 <= betas < 1, got {defaults}")
        super().__init__(params, defaults)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._rng_to_restore: dict[str, torch.Tensor] = {}  # from load_state_dict, applied when first needed

    def _math_tensors(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, grad) to do the math on: p and its grad themselves, or fp32 copies of them for a bf16 p."""
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if p.dtype == torch.bfloat16:
            return p.float(), p.grad.float()
        return p, p.grad

    def _write_back(self, p: torch.Tensor, weight: torch.Tensor) -> None:
        if weight is not p:
            stochastic_round_(p, weight, self._generator(p.device))

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device).manual_seed(self.seed)
            if key in self._rng_to_restore:
                g.set_state(self._rng_to_restore.pop(key))
            self._generators[key] = g
        return self._generators[key]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rng"] = {**self._rng_to_restore, **{k: g.get_state() for k, g in self._generators.items()}}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._rng_to_restore, self._generators = dict(state_dict.pop("rng", {})), {}
        super().load_state_dict(state_dict)
        # torch casts loaded state to each param's dtype; the fp32 moments of a bf16 param must stay fp32.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, copy=True)


class AdamWBF16(_RoundingOptimizer):
    """AdamW for pure-bf16 training (SimpleTuner's `adamw_bf16`); takes params (bf16 or fp32), lr, betas, eps,
    weight_decay and the rounding seed.

    Per step t, for each param w with gradient g (in fp32):
        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2            (m, v kept in fp32)
        w = w (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
    A bf16 w is updated in an fp32 copy and written back with *stochastic rounding* (not Kahan summation): an
    update smaller than half a bf16 ulp (bf16 keeps 8 bits of mantissa, ulp 2^-7 at 1.0) would vanish under
    round-to-nearest every step, whereas stochastic rounding is unbiased in expectation, so many small updates add
    up to the right amount, with no extra per-param buffer (Kahan would need one). fp32 params: exactly AdamW.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), seed)

    def _tensor_lr(self, lr: float, grad: torch.Tensor, exp_avg_sq: torch.Tensor, bias_correction2: float,
                   eps: float) -> float:
        """The learning rate of this tensor at this step: lr itself (StableAdamW scales it)."""
        return lr

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                weight, grad = self._math_tensors(p)
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(weight), exp_avg_sq=torch.zeros_like(weight))
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)  # m = b1 m + (1 - b1) g
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = b2 v + (1 - b2) g^2
                bias_correction1, bias_correction2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                tensor_lr = self._tensor_lr(lr, grad, v, bias_correction2, eps)
                weight.mul_(1 - tensor_lr * wd)  # decoupled weight decay
                denom = (v.sqrt() / bias_correction2**0.5).add_(eps)  # sqrt(v_hat) + eps, in torch's op order
                weight.addcdiv_(m, denom, value=-tensor_lr / bias_correction1)  # w -= lr m_hat / denom
                self._write_back(p, weight)
        return loss


class StableAdamW(AdamWBF16):
    """AdamW with per-tensor update clipping (Wortsman et al. 2023, "Stable and low-precision training for
    large-scale vision-language models", AdaFactor's update clipping added to AdamW); takes what AdamWBF16 takes.

    For each parameter tensor, after updating m and v with the current gradient g:
        rms = sqrt(mean(g^2 / max(v_hat, eps^2)))      (mean over the tensor's elements)
        lr_t = lr / max(1, rms)
        w = w (1 - lr_t wd) - lr_t m_hat / (sqrt(v_hat) + eps)
    rms > 1 means v lags behind a sudden rise in the gradient (AdamW would take an outsized step), so the step
    shrinks; rms <= 1 leaves plain AdamW. bf16 params are handled as in AdamWBF16 (stochastic rounding).
    One host sync per tensor per step (rms.item()), negligible for LoRA-sized param lists.
    """

    def _tensor_lr(self, lr: float, grad: torch.Tensor, exp_avg_sq: torch.Tensor, bias_correction2: float,
                   eps: float) -> float:
        v_hat = exp_avg_sq / bias_correction2
        rms = (grad.square() / v_hat.clamp_min(eps * eps)).mean().sqrt().item()
        return lr / max(1.0, rms)


class Lion(_RoundingOptimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"); takes params (bf16 or fp32), lr,
    betas, weight_decay and the rounding seed.

    Per step, for each param w with gradient g:
        update = sign(b1 m + (1 - b1) g)
        w = w - lr (update + wd w)
        m = b2 m + (1 - b2) g
    The paper's betas are (0.9, 0.99): make_optimizer passes train.adam_beta1/adam_beta2 as given, so set
    `adam_beta2: 0.99` for Lion. Its sign update is larger than AdamW's: the paper uses lr 3-10x smaller and
    weight decay 3-10x larger than for AdamW. bf16 params are handled as in AdamWBF16 (stochastic rounding).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay), seed)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                weight, grad = self._math_tensors(p)
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(weight)
                m = state["exp_avg"]
                update = m.lerp(grad, 1 - beta1).sign_()  # sign(b1 m + (1 - b1) g)
                weight.mul_(1 - lr * wd).add_(update, alpha=-lr)  # w -= lr (update + wd w)
                m.lerp_(grad, 1 - beta2)  # m = b2 m + (1 - b2) g
                self._write_back(p, weight)
        return loss
