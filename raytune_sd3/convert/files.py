"""Reading SimpleTuner's files in every form its loaders take: config.json (keys with or without `--`), config.toml,
config.env (`KEY=value` lines, as train.sh sources them, plus TRAINER_EXTRA_ARGS), and the web UI's saved forms
(`{"_metadata": ..., "config": {...}}`, or `_metadata` beside the keys; a data loader as `{"_metadata": ...,
"datasets": [...]}`). Each reader returns plain Python data, or raises ConvertError naming the file."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from raytune_sd3.convert.report import ConvertError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib


# config.env names SimpleTuner's loader reads, as the option each sets (its env_file map): the irregular ones ...
ENV_OPTIONS = {
    "RESUME_CHECKPOINT": "resume_from_checkpoint", "DATALOADER_CONFIG": "data_backend_config",
    "TRAINING_SEED": "seed", "MINIMUM_RESOLUTION": "minimum_image_size", "MAX_NUM_STEPS": "max_train_steps",
    "NUM_EPOCHS": "num_train_epochs", "CHECKPOINTING_STEPS": "checkpoint_step_interval",
    "CHECKPOINTING_LIMIT": "checkpoints_total_limit", "HUB_MODEL_NAME": "hub_model_id",
    "MODEL_NAME": "pretrained_model_name_or_path", "USE_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "VALIDATION_STEPS": "validation_step_interval", "LR_SCHEDULE": "lr_scheduler",
    "TRAINING_NUM_PROCESSES": "num_processes", "TRAINING_NUM_MACHINES": "num_machines",
    "PUSH_CHECKPOINTS": "push_checkpoints_to_hub", "ACCELERATE_CONFIG_PATH": "accelerate_config",
    "USE_XFORMERS": "enable_xformers_memory_efficient_attention",
}
# ... and those whose option is the same name in lower case
ENV_OPTIONS |= {name.upper(): name for name in (
    "aspect_bucket_rounding", "accelerate_extra_args", "use_ema", "output_dir", "use_dora", "lora_type",
    "lycoris_config", "push_to_hub", "checkpoint_step_interval", "checkpoint_epoch_interval", "tracker_project_name",
    "tracker_run_name", "model_type", "model_family", "train_batch_size", "caption_dropout_probability",
    "resolution_type", "resolution", "validation_seed", "validation_step_interval", "validation_epoch_interval",
    "validation_resolution", "validation_guidance", "validation_guidance_rescale", "validation_num_inference_steps",
    "validation_prompt", "validation_negative_prompt", "allow_tf32", "mixed_precision", "optimizer", "learning_rate",
    "lr_warmup_steps", "lr_end", "base_model_precision", "quantize_via", "gradient_accumulation_steps",
    "model_card_safe_for_work", "metadata_update_interval", "read_batch_size", "write_batch_size",
    "text_encoder_batch_size", "image_processing_batch_size", "max_workers", "disable_benchmark")}


def _env_pairs(path: Path, text: str) -> dict[str, str]:
    """KEY=value and KEY+=value lines (optionally after `export`), quotes stripped, $NAME / ${NAME} of earlier lines
    expanded as the shell that sources the file would."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*(\+?=)\s*(.*)", line)
        if not m:
            raise ConvertError(f"{path}: line {number}: not KEY=value ({raw.strip()[:60]!r}); expected a SimpleTuner "
                               "config.env")
        key, op, value = m.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        value = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda g: values.get(g.group(1) or g.group(2), ""), value).strip()
        values[key] = f"{values[key]} {value}".strip() if op == "+=" and key in values else value
    return values


def _extra_args(path: Path, text: str) -> dict[str, Any]:
    """TRAINER_EXTRA_ARGS: `--key=value`, `--key value` or a bare `--flag` (true). They reach SimpleTuner's argument
    parser as written, so `--flag=false` turns a flag off (unlike a config.env value "false")."""
    out: dict[str, Any] = {}
    words = shlex.split(text)
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ConvertError(f"{path}: TRAINER_EXTRA_ARGS: {word!r} is not an --option")
        if "=" in word:
            key, value = word[2:].split("=", 1)
        elif i + 1 < len(words) and not words[i + 1].startswith("--"):
            key, value, i = word[2:], words[i + 1], i + 1
        else:
            key, value = word[2:], "true"
        out[key] = {"true": True, "false": False}.get(value.strip().lower(), value)
        i += 1
    return out


def read_env(path: Path, text: str) -> tuple[dict[str, Any], list[str]]:
    """A config.env -> (SimpleTuner options, the names SimpleTuner's loader would not read)."""
    options: dict[str, Any] = {}
    unread = []
    for key, value in _env_pairs(path, text).items():
        if key == "TRAINER_EXTRA_ARGS":
            continue
        if key in ENV_OPTIONS:
            options[ENV_OPTIONS[key]] = value
        else:
            unread.append(key)
    # the loader appends TRAINER_EXTRA_ARGS after the mapped names, so an option given in both takes its value here
    options |= _extra_args(path, _env_pairs(path, text).get("TRAINER_EXTRA_ARGS", ""))
    return options, unread


def _read_text(path: Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e}); expected {what}") from None


def _parse(path: Path, text: str, what: str) -> Any:
    """JSON, or TOML for a .toml file; anything else is neither."""
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConvertError(f"{path}: not valid TOML ({e}); expected {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        try:
            return tomllib.loads(text)  # a config.toml saved under another name
        except tomllib.TOMLDecodeError:
            pass
        raise ConvertError(f"{path}: neither JSON (line {e.lineno}, column {e.colno}: {e.msg}) nor TOML nor "
                           f"KEY=value env lines; expected {what}") from None


def _is_env(path: Path, text: str) -> bool:
    """By its name (config.env), else by its lines when it is neither JSON nor TOML (a TOML `key = 1` looks alike)."""
    if path.suffix.lower() in (".env", ".json", ".toml"):
        return path.suffix.lower() == ".env"
    try:
        json.loads(text)
        return False
    except json.JSONDecodeError:
        pass
    try:
        tomllib.loads(text)
        return False
    except tomllib.TOMLDecodeError:
        pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return bool(lines) and all(re.match(r"(export\s+)?[A-Za-z_][A-Za-z0-9_]*\s*\+?=", ln) for ln in lines)


def read_config(path: Path) -> tuple[dict[str, Any], list[str]]:
    """SimpleTuner's config (JSON, TOML, env, or the web UI's `_metadata` forms) -> (its options by name as written,
    lines for the report: env names SimpleTuner does not read)."""
    what = "a SimpleTuner config (config.json, config.toml or config.env: options such as model_family)"
    text = _read_text(path, what)
    if _is_env(path, text):
        options, unread = read_env(path, text)
        return options, [f"{name} (SimpleTuner's config.env loader does not read it)" for name in unread]
    data = _parse(path, text, what)
    if isinstance(data, dict) and "_metadata" in data:  # the web UI's saved config: wrapped or flat
        data = data["config"] if isinstance(data.get("config"), dict) else {
            k: v for k, v in data.items() if k != "_metadata"}
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: not {what}")
    return data, []


def read_backends(path: Path) -> list[Any]:
    """SimpleTuner's data-loader file: a JSON list, the web UI's `{"_metadata": ..., "datasets": [...]}`, or a TOML
    file of [[datasets]] tables."""
    what = "a SimpleTuner multidatabackend.json (a JSON list of data sets)"
    data = _parse(path, _read_text(path, what), what)
    if isinstance(data, dict) and isinstance(data.get("datasets"), list):
        data = data["datasets"]
    elif isinstance(data, dict) and "_metadata" in data and isinstance(data.get("config"), list):
        data = data["config"]
    if not isinstance(data, list):
        raise ConvertError(f"{path}: not {what}")
    return data
