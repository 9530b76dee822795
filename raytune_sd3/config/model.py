"""The model a job trains on: the base SD3 pipeline (`model:` where it comes from, its dtype, its quantisation) and
how its text encoders read the captions (`text:`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator

from raytune_sd3.config.section import Section, is_uri, path_text

TINY_MODELS = ("tiny-sd3", "tiny-sd35")


class ModelConfig(Section):
    pretrained: Annotated[str, BeforeValidator(path_text)] = "tiny-sd3"
    """A diffusers SD3 directory (a relative or ~ path is made absolute where the command runs), a hub id already
    in the local HF cache, or tiny-sd3 / tiny-sd35 (built offline)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `pretrained` is a hub id."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype of the frozen base transformer and VAE (and of the cached latents and embeddings); auto: bf16 when the
    job trains on GPUs, fp32 on CPUs (job.yaml records what it became). LoRA weights train in fp32 unless
    lora.dtype says so."""
    text_encoder_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype the three text encoders run in while caching (T5-XXL is 19 GB in fp32, 9.5 GB in bf16); auto: bf16
    when the cluster has GPUs, else fp32. Part of the text cache key."""
    quantize: Literal["none", "int8", "int4", "int2", "fp8", "nf4"] = "none"
    """Quantise the frozen base transformer's weights: int8/int4/int2/fp8 with optimum-quanto (SimpleTuner's
    int8-quanto etc.), nf4 with bitsandbytes (4-bit NormalFloat, CUDA only; SimpleTuner's nf4-bnb); norms,
    proj_out, pos_embed, context_embedder and time_text_embed stay in full precision."""

    @field_validator("pretrained")
    @classmethod
    def _not_a_url(cls, v: str) -> str:
        if is_uri(v) or v.startswith(("http:", "https:")):
            raise ValueError("is a folder, a hub id (owner/name) or a tiny model, not a URL; download the model "
                             "(`hf download owner/name`) and give its id or folder")
        return v


class TextConfig(Section):
    t5_max_length: int = Field(154, ge=1, le=512)
    """T5 tokens per prompt: 154 (SimpleTuner, SD3.5 default) or 77 (smaller cache, some quality loss)."""
    t5_padding: Literal["unmodified", "zero"] = "unmodified"
    """`unmodified` keeps T5's outputs at padding positions (Stability, diffusers); `zero` masks them to zero."""
    uncond: Literal["empty_string", "zero"] = "empty_string"
    """Unconditional embedding for caption dropout and CFG: the encoded empty caption, or zeros."""
