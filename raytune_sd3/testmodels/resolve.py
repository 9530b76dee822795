"""The folder a model name is loaded from: a tiny model's name becomes its built folder (built on first use, here
once per machine), a validation model's name its local folder; any other pretrained name passes through.

The builders are imported only when a tiny model is not built yet: their diffusers import costs the driver ~7 s.
"""

from __future__ import annotations

from raytune_sd3.config import TINY_MODELS, JobConfig
from raytune_sd3.models.loading import (
    VALIDATION_MODELS,
    local_model_dir,
    tiny_models_root,
    tiny_pipeline_dir,
    validation_model_name,
    validation_model_problem,
)


def resolve_pretrained(pretrained: str) -> str:
    """A tiny model name becomes its built directory (built on first use); anything else passes through."""
    if pretrained in TINY_MODELS:
        built = tiny_pipeline_dir(pretrained)
        if (built / "model_index.json").exists():
            return str(built)  # without importing the builder, whose diffusers import costs the driver ~7 s
        from raytune_sd3.testmodels.tiny import ensure_tiny_pipeline  # start-up time: imported only to build

        return str(ensure_tiny_pipeline(pretrained))
    return pretrained


def resolve_validation_model(cfg: JobConfig, key: str) -> str | None:
    """The folder workers load validation.<key> from (the tiny stand-in built on first use); None when off.
    Raises FileNotFoundError when the model is not here (preflight says so earlier, with the fix)."""
    name = validation_model_name(cfg, key)
    if name is None:
        return None
    tiny = VALIDATION_MODELS[key][2]
    if name == tiny:
        built = tiny_models_root() / tiny
        if (built / "config.json").exists():
            return str(built)
        from raytune_sd3.testmodels.tiny_validation import build_tiny_clip, build_tiny_taesd  # start-up time

        return str((build_tiny_clip if key == "clip_model" else build_tiny_taesd)(built))
    folder = local_model_dir(name)
    if folder is None:
        raise FileNotFoundError(validation_model_problem(cfg, key))
    return str(folder)


def resolve_validation_models(cfg: JobConfig) -> dict[str, str | None]:
    """{"clip_model": folder or None, "preview_model": folder or None} for the workers (resolve_validation_model)."""
    return {key: resolve_validation_model(cfg, key) for key in VALIDATION_MODELS}
