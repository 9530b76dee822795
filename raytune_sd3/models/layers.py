"""What a job asks of the transformer's layers (lora.blocks, lora.targets, validation.skip_layers), checked on the
driver against the model's config alone, before any worker loads weights.

The config is known without weights for the tiny models (TINY_TRANSFORMER below, which testmodels/tiny.py builds
from), a local diffusers folder (transformer/config.json), a hub id in the local HF cache, or the built-in table of
known models. An explicit list of targets is matched against the layer names of a transformer of that config built
on torch's meta device (no memory, no weights), by the same function the workers use.
"""

from __future__ import annotations

from typing import Any

from raytune_sd3.config import TINY_MODELS, JobConfig
from raytune_sd3.models.catalogue import transformer_config

# The tiny random SD3 transformer (a 64px image is 8 latent px, 4x4 patches); tiny-sd35 adds SD3.5's parts.
TINY_TRANSFORMER: dict[str, Any] = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=96,  # = T5 width; CLIP embeds (32 + 48) are zero-padded up to it
    caption_projection_dim=32,
    pooled_projection_dim=80,  # = 32 + 48 pooled CLIP-L + CLIP-G
    pos_embed_max_size=64,
)
TINY_SD35_EXTRA: dict[str, Any] = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}


def tiny_transformer_config(name: str) -> dict[str, Any]:
    """The transformer config of the tiny model `name` (tiny-sd3 or tiny-sd35)."""
    return {**TINY_TRANSFORMER, **(TINY_SD35_EXTRA if name == "tiny-sd35" else {})}


def known_transformer_config(pretrained: str, revision: str | None = None) -> dict[str, Any] | None:
    """The transformer's config where it is known without weights or a download, else None."""
    if pretrained in TINY_MODELS:
        return tiny_transformer_config(pretrained)
    try:
        return transformer_config(pretrained, revision)[0]
    except (ValueError, OSError):  # a model not reachable from here: check_paths and check_model say so
        return None


def layer_problems(cfg: JobConfig) -> list[str]:
    """Why the job's block and layer choices do not fit its transformer (`key: what, and the fix` each); [] when
    they fit or the config is not known here."""
    config = known_transformer_config(cfg.model.pretrained, cfg.model.revision)
    if not isinstance(config, dict) or not isinstance(config.get("num_layers"), int):
        return []
    layers = config["num_layers"]
    problems = []
    for key, blocks in (("lora.blocks", cfg.lora.blocks), ("validation.skip_layers", cfg.validation.skip_layers)):
        outside = sorted({b for b in blocks or () if not 0 <= b < layers})
        if outside:
            problems.append(f"{key}: block(s) {outside} not in {cfg.model.pretrained}, which has {layers} blocks "
                            f"(0 to {layers - 1})")
    if cfg.lora.targets == []:
        problems.append("lora.targets: an empty list trains nothing; name module suffixes (e.g. [attn.to_q]) or a "
                        "preset (attention, attention+context, all)")
    elif isinstance(cfg.lora.targets, list) and not problems:
        problems += _unmatched_targets(cfg, config)
    return problems


def _unmatched_targets(cfg: JobConfig, config: dict[str, Any]) -> list[str]:
    """Each target suffix that matches no linear layer of a transformer of `config` (in lora.blocks)."""
    # imported here for start-up time: models.lora loads torch
    from raytune_sd3.models.lora import target_modules

    transformer = meta_transformer(config)
    if transformer is None:
        return []
    unmatched = []
    for suffix in cfg.lora.targets:
        try:
            target_modules(transformer, cfg.lora.model_copy(update={"targets": [suffix]}))
        except ValueError:
            unmatched.append(suffix)
    if not unmatched:
        return []
    where = f" in blocks {cfg.lora.blocks}" if cfg.lora.blocks is not None else ""
    return [f"lora.targets: {unmatched} match no linear layer of {cfg.model.pretrained}{where} (a target is the end "
            "of a layer name, e.g. attn.to_q or ff.net.2; or use a preset: attention, attention+context, all)"]


def meta_transformer(config: dict[str, Any]):
    """A transformer of `config` on torch's meta device (its layer names and shapes, no memory), or None where
    diffusers cannot build that config (loading the model reports it, not the checks that use this)."""
    # start-up time: torch and diffusers only when a check needs the layers
    import torch
    from diffusers import SD3Transformer2DModel

    try:
        with torch.device("meta"):
            return SD3Transformer2DModel.from_config(config)
    except Exception:  # noqa: BLE001 - any config diffusers refuses
        return None
