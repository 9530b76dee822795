"""What is known about the SD3-family models without loading them: the hub's transformer configs, the VAE's size,
and where a model's config.json and parameter count come from (a local folder, the local HF cache, or the table).

memory.py's estimate and models/layers.py's target check read it; the shaped stand-ins (testmodels/shaped.py)
are built from it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

# diffusers config.json of the hub's SD3-family transformers (transformer/config.json), for hub ids not cached here.
KNOWN_TRANSFORMERS: dict[str, dict] = {
    "stabilityai/stable-diffusion-3.5-large": {
        "num_layers": 38, "num_attention_heads": 38, "attention_head_dim": 64, "joint_attention_dim": 4096,
        "pooled_projection_dim": 2048, "caption_projection_dim": 2432, "patch_size": 2, "in_channels": 16,
        "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": "rms_norm", "dual_attention_layers": [],
        "sample_size": 128,
    },
    "stabilityai/stable-diffusion-3.5-medium": {
        "num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64, "joint_attention_dim": 4096,
        "pooled_projection_dim": 2048, "caption_projection_dim": 1536, "patch_size": 2, "in_channels": 16,
        "out_channels": 16, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
        "dual_attention_layers": list(range(13)), "sample_size": 128,
    },
    "stabilityai/stable-diffusion-3-medium-diffusers": {
        "num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64, "joint_attention_dim": 4096,
        "pooled_projection_dim": 2048, "caption_projection_dim": 1536, "patch_size": 2, "in_channels": 16,
        "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": None, "dual_attention_layers": [],
        "sample_size": 128,
    },
}
KNOWN_TRANSFORMERS["stabilityai/stable-diffusion-3.5-large-turbo"] = KNOWN_TRANSFORMERS[
    "stabilityai/stable-diffusion-3.5-large"]
# The 16-channel SD3 VAE (AutoencoderKL, block_out_channels 128/256/512/512, 2 layers per block, no quant convs),
# shared by SD3 and SD3.5: its parameter count, for hub ids not cached here.
SD3_VAE_PARAMS = 83_819_683

# --- the transformer's shape ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerShape:
    """The numbers of an SD3Transformer2DModel config that decide its memory."""

    num_layers: int
    num_heads: int
    head_dim: int
    joint_attention_dim: int
    pooled_projection_dim: int
    caption_projection_dim: int
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 96
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_config(cls, cfg: dict) -> TransformerShape:
        if cfg.get("qk_norm") not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {cfg['qk_norm']!r} is not one SD3 uses (None or rms_norm)")
        return cls(
            num_layers=cfg.get("num_layers", 18), num_heads=cfg.get("num_attention_heads", 18),
            head_dim=cfg.get("attention_head_dim", 64), joint_attention_dim=cfg.get("joint_attention_dim", 4096),
            pooled_projection_dim=cfg.get("pooled_projection_dim", 2048),
            caption_projection_dim=cfg.get("caption_projection_dim", 1152), patch_size=cfg.get("patch_size", 2),
            in_channels=cfg.get("in_channels", 16), out_channels=cfg.get("out_channels") or cfg.get("in_channels", 16),
            pos_embed_max_size=cfg.get("pos_embed_max_size") or 96, qk_norm=cfg.get("qk_norm") == "rms_norm",
            dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
        )


def transformer_config(pretrained: str, revision: str | None = None) -> tuple[dict, str]:
    """The transformer's config.json and where it came from: a local folder, the local HF cache, or the table."""
    local = Path(pretrained).expanduser() / "transformer" / "config.json"
    if local.is_file():
        return json.loads(local.read_text()), str(local)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(pretrained, "transformer/config.json", revision=revision)
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text()), cached
    except Exception:  # not a valid repo id, or no cache: fall through to the table
        pass
    if pretrained in KNOWN_TRANSFORMERS:
        return KNOWN_TRANSFORMERS[pretrained], "built-in table (the hub's config.json)"
    raise ValueError(f"{pretrained}: no transformer/config.json in it or in the local HF cache, and not one of the "
                     f"known models ({', '.join(sorted(KNOWN_TRANSFORMERS))})")


def safetensors_params(folder: Path) -> int | None:
    """Parameter count from the safetensors headers of a folder (reads only the headers), or None."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(f, framework="numpy") as weights:  # maps the file; get_slice reads no tensor
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def vae_params(pretrained: str) -> int:
    local = Path(pretrained).expanduser() / "vae"
    return (safetensors_params(local) if local.is_dir() else None) or SD3_VAE_PARAMS


def vae_channels(pretrained: str) -> int:
    """Channels of the VAE decoder's full-resolution level (128 for the SD3 VAE)."""
    cfg = Path(pretrained).expanduser() / "vae" / "config.json"
    return json.loads(cfg.read_text())["block_out_channels"][0] if cfg.is_file() else 128
