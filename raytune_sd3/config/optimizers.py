"""train.optimizer: the one registry of optimizers.

Every optimizer the trainer builds, with what the rest of the package needs to know of it. The schema's Literal is
made from it; the factory (train/optim.py BUILDERS), the memory estimate (memory.py), the SimpleTuner converter
(convert/optimizer.py) and the preflight (driver/preflight.py) read it; tests/test_optim.py fails when a name here is missing
from any of them, or when a state size here differs from what the optimizer really keeps.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class OptimizerFacts:
    """What is known of one train.optimizer without building it."""

    state_tensors: int
    """Tensors of a parameter's size it keeps per parameter (moments, a copy of the weights)."""
    state_dtype: Literal["param", "fp32", "8bit"]
    """Their dtype: the parameter's own (torch's and the libraries' optimizers), always fp32 (ours keep fp32 state
    for bf16 weights), or one byte per element (bitsandbytes; its blockwise scales, 4 bytes per 256, left out)."""
    package: str | None = None
    """The package that provides it, which the preflight checks is installed (None: torch, or ours)."""
    cuda_only: bool = False
    """Runs on CUDA GPUs only (bitsandbytes)."""
    paged: bool = False
    """State in CUDA paged memory (counted on the GPU by the estimate; CUDA spills it to host RAM under pressure)."""
    schedule_free: bool = False
    """Trains at one point and evaluates at another (its average): eval loss, validation and saves switch it to eval
    mode, and it replaces the LR schedule (train.lr_scheduler must be constant)."""
    not_under_zero: str | None = None
    """Why it cannot run under DeepSpeed ZeRO (train.strategy zero2/zero3), or None where it can."""

    def state_bytes(self, param_bytes: int) -> int:
        """Bytes of optimizer state per trained parameter stored in `param_bytes` bytes."""
        return self.state_tensors * {"param": param_bytes, "fp32": 4, "8bit": 1}[self.state_dtype]


BNB = "bitsandbytes"
POLYNOMIAL_LR_END = 1e-7  # where diffusers' polynomial schedule ends (get_scheduler takes no lr_end)
OPTIMIZERS: dict[str, OptimizerFacts] = {
    "adamw": OptimizerFacts(2, "param"),  # exp_avg, exp_avg_sq
    "adamw_bf16": OptimizerFacts(2, "fp32"),
    "stableadamw": OptimizerFacts(2, "fp32"),
    "lion": OptimizerFacts(1, "fp32"),  # exp_avg
    "adamw8bit": OptimizerFacts(2, "8bit", BNB, cuda_only=True),
    "lion8bit": OptimizerFacts(1, "8bit", BNB, cuda_only=True),
    "adamw8bit_paged": OptimizerFacts(2, "8bit", BNB, cuda_only=True, paged=True),
    "lion8bit_paged": OptimizerFacts(1, "8bit", BNB, cuda_only=True, paged=True),
    # exp_avg, exp_avg_sq, s (the d estimate's gradient sum) and p0 (the starting weights; a scalar for a tensor
    # that starts at zero, as LoRA's B does: the count is the bound)
    "prodigy": OptimizerFacts(4, "param", "prodigyopt", not_under_zero=(
        "Prodigy estimates one step size from every parameter at once, and ZeRO gives each worker a shard of them "
        "(each would estimate its own)")),
    "adamw_schedulefree": OptimizerFacts(2, "param", "schedulefree", schedule_free=True, not_under_zero=(
        "its switch to the averaged weights for evaluation and saving acts on the optimizer's copy, which ZeRO "
        "keeps apart from the model's")),  # z, exp_avg_sq
}
