"""The adapter a job trains (`lora:`): LoRA, DoRA or LyCORIS's LoKr / LoHa, its rank, targets and starting file,
and which training strategies each kind can run under."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raytune_sd3.config.section import PathText, Section

# An upper bound on lora.rank, so a typo (10**30) is refused at the door instead of "fitting" in 1e25 GiB. Far above
# what LoRA uses (4-128).
MAX_LORA_RANK = 1024
INIT_FROM_SETS = ("kind", "rank", "alpha", "targets", "blocks")  # what lora.init_from takes from its file
LYCORIS_KINDS = ("lokr", "loha")  # lora.kind values trained through the lycoris-lora library


class LycorisConfig(Section):
    """LoKr's own settings (lora.kind lokr), as LyCORIS and SimpleTuner's lycoris_config name them. LoHa has none
    beyond lora.rank and lora.alpha."""

    factor: int = -1
    """How LoKr splits each weight into a Kronecker product: the small factor's side (e.g. 4, 8, 16; larger: fewer
    parameters, a coarser update); -1: as balanced as the layer's sizes allow (LyCORIS's default)."""
    full_matrix: bool = False
    """Train LoKr's second factor whole instead of as a rank-lora.rank product (more parameters, scale 1: lora.rank
    and lora.alpha then do not matter)."""

    @field_validator("factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError(f"factor {v}: give a positive side for LoKr's small factor (e.g. 8), or -1 for "
                             "LyCORIS's balanced split")
        return v


class LoraConfig(Section):
    rank: int = Field(16, ge=1, le=MAX_LORA_RANK)
    """LoRA rank (at most MAX_LORA_RANK 1024)."""
    alpha: float | None = None
    """LoRA alpha; default = rank (scale 1). Other values are folded into lora_B when saving."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch."""
    targets: Literal["attention", "attention+context", "all"] | list[str] = "attention"
    """Preset (`attention`: to_q/k/v/out.0, SimpleTuner; `attention+context`: also add_*_proj/to_add_out, diffusers;
    `all`: also feed-forward) or an explicit list of module-name suffixes."""
    blocks: list[int] | None = None
    """Only these transformer blocks get LoRA; default all."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """dtype of the LoRA weights: fp32 (default) or bf16 for pure-bf16 training (use train.optimizer adamw_bf16)."""
    kind: Literal["lora", "dora", "lokr", "loha"] = "lora"
    """lora, or dora (peft's DoRA: a trained magnitude per output row on top of the LoRA direction; saved in
    diffusers' layout with its `lora_magnitude_vector`s, which StableDiffusion3Pipeline.load_lora_weights loads),
    or LyCORIS's lokr (a Kronecker product per layer) or loha (a Hadamard product of two rank-lora.rank products),
    trained on the same layers through the lycoris-lora library and saved in LyCORIS's own SD3 layout
    (`lycoris_transformer_blocks_0_attn_to_q.lokr_w1`, ...), the one SimpleTuner writes and ComfyUI and Forge load."""
    lycoris: LycorisConfig | None = None
    """LoKr's settings (factor, full_matrix), with lora.kind lokr only; default: LyCORIS's."""
    init_from: PathText | None = None
    """Start from this LoRA instead of a fresh one: a .safetensors file, or a folder holding
    pytorch_lora_weights.safetensors (ours, diffusers', SimpleTuner's or ai-toolkit's SD3 LoRA). Its kind, rank, alpha
    and targets are used; a job that names other ones is refused. Ours fold alpha into lora_B (alpha = rank). Not
    for lokr / loha (a LyCORIS file is refused: diffusers, whose converter this uses, reads none)."""

    @model_validator(mode="after")
    def _lycoris_settings(self) -> LoraConfig:
        if self.lycoris is not None and self.kind != "lokr":
            raise ValueError(f"lora.lycoris (factor, full_matrix) holds LoKr's settings, and lora.kind is "
                             f"{self.kind}: remove lora.lycoris, or set lora.kind: lokr")
        if self.kind in LYCORIS_KINDS and self.dropout:
            raise ValueError(f"lora.dropout {self.dropout:g} with lora.kind {self.kind}: LyCORIS's LoKr and LoHa "
                             "have no dropout (it would silently do nothing); remove lora.dropout")
        return self

    @property
    def lycoris_settings(self) -> LycorisConfig:
        """lora.lycoris, or LyCORIS's defaults where it is not given."""
        return self.lycoris or LycorisConfig()


def adapter_problem(kind: str, strategy: str) -> str | None:
    """Why an adapter of lora.kind `kind` cannot train with `strategy`, or None (checked at the door, and again once
    lora.init_from has given the kind)."""
    if kind == "dora" and strategy == "zero3":
        return ("lora.kind dora with train.strategy zero3 cannot train: DoRA reads each whole base weight (for its "
                "row norms) outside that layer's own forward, where ZeRO-3 holds only this worker's shard of it; use "
                "train.strategy zero2 or ddp (with model.quantize to fit a large base), or lora.kind: lora")
    if kind in LYCORIS_KINDS and strategy == "zero3":
        return (f"lora.kind {kind} with train.strategy zero3 cannot train: LyCORIS runs its factors inside each "
                "adapted layer's forward, never through their own module's call, so ZeRO-3's hooks never gather them "
                "from the workers' shards; use train.strategy zero2 or ddp (with model.quantize to fit a large "
                "base), or lora.kind: lora")
    return None
