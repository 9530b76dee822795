"""Tune's search-space policy: which job keys may vary between the trials of a study, and why the others may not
(the `tune:` section's schema is in schema.py and asks this module)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from raytune_sd3.config.overrides import did_you_mean

# Keys that may vary between trials: whole sections, minus the keys below.
TUNABLE_PREFIXES = ("train.", "flow.", "lora.", "data.caption_dropout")
FIXED_KEYS = {
    "flow.eval_sigmas": "it defines the eval loss: trials would not be comparable",
    "train.max_steps": "ASHA's budget is in steps: set it in the job",
    "train.eval_every": "ASHA compares eval losses at these steps: set it in the job",
    "train.max_nonfinite_steps": "the divergence rule must be the same for every trial",
    "train.divergence_factor": "the divergence rule must be the same for every trial",
    "train.grad_norm_limit": "the divergence rule must be the same for every trial",
    "train.use_gpu": "a study-wide setting",
}
SEARCH_PACKAGES = ("optuna", "hyperopt")  # searchers that need their package installed
WHY_NOT = ("trials share one cache and one eval set, so only train.*, flow.*, lora.* and data.caption_dropout "
           "may vary")


def check_key(key: str, root: type[BaseModel]) -> str:
    """A dotted path that exists in the job schema `root` (JobConfig) and may vary between trials; ValueError naming
    the fix."""
    if key in FIXED_KEYS:
        raise ValueError(f"{key} cannot vary between trials: {FIXED_KEYS[key]}")
    if not key.startswith(TUNABLE_PREFIXES):
        raise ValueError(f"{key} cannot vary between trials: {WHY_NOT}")
    model: Any = root
    for part in key.split("."):
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        if part not in fields:
            raise ValueError(f"{key}: no such job key{did_you_mean(part, list(fields))}")
        model = fields[part].annotation
    return key
