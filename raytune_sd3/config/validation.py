"""The images a run samples to show what it learned (`validation:`): prompts, sizes, guidance and skip-layer
guidance, CLIP scores, live previews and the webhook they are posted to."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from raytune_sd3.config.secrets import REDACTED, remember_secret
from raytune_sd3.config.section import MAX_RESOLUTION, Section


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
