"""python -m raytune_sd3.convert simpletuner CONFIG.json MULTIDATABACKEND.json -o job.yaml [--force]

Turns a SimpleTuner SD3 setup (its config.json, keys with or without a leading `--`, and the multidatabackend.json
it trains on) into our job YAML. Every SimpleTuner setting ends in one of four places: converted to our key; "not
converted" (no equivalent here, or a value we cannot express); "ignored" (meaningless here, e.g. SimpleTuner's own
cache folders); or "dropped secret" (a token is never copied). The lists are printed and written as comments at the
top of the job, which is validated like any job before it is written (atomically).

Exit status: 0 written (read the lists), 2 nothing written: an input is unreadable, not SimpleTuner's, or does not
make a valid job.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_sd3.config import SECRET_KEY, SECRET_VALUE, ConfigError, JobConfig, dump_job, load_job, parse_resolutions


class ConvertError(ValueError):
    """An input that cannot be converted; the message names the file."""


class NotConverted(Exception):
    """A setting we cannot express; the message says why."""


class Ignored(Exception):
    """A setting that means nothing here; the message says why."""


@dataclass
class Conversion:
    """The converted job (a dict that validates as JobConfig) and what became of every other setting."""

    job: dict[str, Any] = field(default_factory=dict)
    converted: int = 0
    not_converted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def report(self) -> list[str]:
        return ([f"not converted: {x}" for x in self.not_converted] + [f"ignored: {x}" for x in self.ignored]
                + [f"dropped secret: {x}" for x in self.secrets] + [f"note: {x}" for x in self.notes])


@dataclass
class Scope:
    """What a rule sees: the SimpleTuner settings being converted (config.json, or one data set with its defaults)
    and our keys converted so far; `where` prefixes a data set's keys in the report."""

    settings: dict[str, Any]
    conv: Conversion
    out: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    folder: Path = Path(".")
    defaults: set[str] = field(default_factory=set)

    def label(self, key: str, value: Any) -> str:
        by_default = ", SimpleTuner's default" if key in self.defaults else ""
        return f"{self.where}{key} = {_fmt(value)}{by_default}"

    def note(self, text: str) -> None:
        self.conv.notes.append(f"{self.where}{text}")


Rule = Callable[[Any, Scope], dict[str, Any]]  # SimpleTuner value -> our keys; raises NotConverted / Ignored


# --- values --------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)  # one line: newlines stay escaped in YAML comments
    return text if len(text) <= 80 else text[:77] + "..."


def _bool(v: Any) -> bool:
    """SimpleTuner's JSON holds flags as booleans or as strings ("true")."""
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _int(v: Any) -> int:
    f = float(v)
    if not f.is_integer():
        raise ValueError(f"expected a whole number, got {v!r}")
    return int(f)


def _list(v: Any) -> list:
    """A JSON list, or a string holding one ("[7, 8, 9]") or comma-separated items ("7,8,9")."""
    if isinstance(v, str):
        v = json.loads(v) if v.strip().startswith("[") else [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, list):
        raise ValueError(f"expected a list, got {v!r}")
    return v


def _is_off(v: Any) -> bool:
    # SimpleTuner passes no flag for false/null, so such a key turns nothing on
    return v is None or v is False or (isinstance(v, str) and v.strip().lower() in ("", "false", "none"))


# --- rule builders ---------------------------------------------------------------------------------------------


def to(key: str, conv: Callable[[Any], Any] = lambda v: v) -> Rule:
    """The value, converted, goes to our `key`."""
    return lambda v, s: {key: conv(v)}


def only(ok: Callable[[Any], bool], why: str) -> Rule:
    """Values where `ok` holds are what we do anyway; any other is listed as not converted."""
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        if not ok(v):
            raise NotConverted(why)
        return {}
    return rule


def choice(key: str, ours: dict[str, Any], why: str) -> Rule:
    """A value named in `ours` (SimpleTuner's name -> ours) goes to our `key`; any other is listed with `why`."""
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        if str(v) not in ours:
            raise NotConverted(why)
        return {key: ours[str(v)]}
    return rule


def flag(key: str, value: Any) -> Rule:
    """A SimpleTuner switch: true sets our `key` to `value`, false needs nothing."""
    return lambda v, s: {key: value} if _bool(v) else {}


def unsupported(why: str) -> Rule:
    return only(lambda v: False, why)


def ignore(why: str) -> Rule:
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        raise Ignored(why)
    return rule


def path(key: str) -> Rule:
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        if not Path(str(v)).expanduser().is_absolute():
            s.note(f"{key} {str(v)!r} is relative: SimpleTuner read it from its own folder, this job reads it from "
                   "where it runs (make it absolute)")
        return {key: str(v)}
    return rule


# --- rules that need more than one key -------------------------------------------------------------------------

FLAVOURS = {"medium": "stabilityai/stable-diffusion-3.5-medium", "large": "stabilityai/stable-diffusion-3.5-large"}
BASE_PRECISION = {"no_change": "none", "int8-quanto": "int8", "int4-quanto": "int4", "int2-quanto": "int2",
                  "fp8-quanto": "fp8", "nf4-bnb": "nf4"}
# SimpleTuner name: (ours, beta1, beta2, eps, weight decay); SimpleTuner builds each optimizer with these defaults
OPTIMIZERS = {
    "adamw_bf16": ("adamw_bf16", 0.9, 0.999, 1e-6, 1e-2),
    "torch-adamw": ("adamw", 0.9, 0.999, 1e-8, 1e-2),
    "bnb-adamw": ("adamw", 0.9, 0.999, 1e-6, 1e-2),
    "optimi-adamw": ("adamw", 0.9, 0.99, 1e-6, 0.0),
    "optimi-stableadamw": ("stableadamw", 0.9, 0.99, 1e-6, 1e-2),
    "optimi-lion": ("lion", 0.9, 0.99, None, 0.0),
    "bnb-lion": ("lion", 0.9, 0.99, None, 0.0),
    "bnb-adamw8bit": ("adamw8bit", 0.9, 0.999, 1e-6, 1e-2),
    "bnb-lion8bit": ("lion8bit", 0.9, 0.99, None, 0.0),
    "bnb-adamw8bit-paged": ("adamw8bit_paged", 0.9, 0.999, 1e-6, 1e-2),
    "bnb-lion8bit-paged": ("lion8bit_paged", 0.9, 0.99, None, 0.0),
}
SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine", "linear": "linear"}


def _flavour(v: Any, s: Scope) -> dict[str, Any]:
    if "pretrained_model_name_or_path" in s.settings:
        raise Ignored("pretrained_model_name_or_path names the model")
    if str(v) not in FLAVOURS:
        raise NotConverted(f"SimpleTuner's SD3 flavours are {', '.join(FLAVOURS)}; set model.pretrained")
    return {"model.pretrained": FLAVOURS[str(v)]}


def _mixed_precision(v: Any, s: Scope) -> dict[str, Any]:
    if v not in ("bf16", "no"):
        raise NotConverted("we autocast to bf16 or not at all (train.mixed_precision bf16 / no)")
    # SimpleTuner loads the frozen base in the mixed-precision dtype
    return {"train.mixed_precision": v, "model.dtype": "bf16" if v == "bf16" else "fp32"}


def _base_dtype(v: Any, s: Scope) -> dict[str, Any]:
    if BASE_PRECISION.get(s.settings.get("base_model_precision", "no_change"), "none") == "none":
        raise Ignored("SimpleTuner applies it to a quantised base only")
    if v not in ("bf16", "fp32"):
        raise NotConverted("SimpleTuner's choices are bf16 and fp32")
    return {"model.dtype": v}


def _t5_length(v: Any, s: Scope) -> dict[str, Any]:
    if _int(v) > 154:
        s.note(f"tokenizer_max_length {v} becomes 154, as SimpleTuner caps it for SD3")
    return {"text.t5_max_length": min(_int(v), 154)}


def _t5_uncond(v: Any, s: Scope) -> dict[str, Any]:
    if v != s.settings.get("sd3_clip_uncond_behaviour", "empty_string"):
        raise NotConverted("one unconditional embedding serves all three encoders here (text.uncond)")
    return {}


def _shift(v: Any, s: Scope) -> dict[str, Any]:
    if _bool(s.settings.get("flow_schedule_auto_shift", False)):
        raise Ignored("flow_schedule_auto_shift overrides it, as in SimpleTuner")
    return {"flow.shift": float(v) if float(v) > 0 else 1.0}  # SimpleTuner's 0 = no shift = our 1.0


def _max_steps(v: Any, s: Scope) -> dict[str, Any]:
    if _int(v) <= 0:
        raise NotConverted("0 makes SimpleTuner train by epochs; we train train.max_steps steps")
    return {"train.max_steps": _int(v)}


def _epochs(v: Any, s: Scope) -> dict[str, Any]:
    if _int(s.settings.get("max_train_steps") or 0) > 0:
        raise Ignored("max_train_steps takes precedence, as in SimpleTuner")
    raise NotConverted("we train by steps: set train.max_steps (epochs x images / global batch)")


def _push_to_hub(v: Any, s: Scope) -> dict[str, Any]:
    if _bool(v) and not s.settings.get("hub_model_id"):
        raise NotConverted("set hub.repo_id (owner/name, or a name under the token's account) to upload")
    return {}


def _hub_model_id(v: Any, s: Scope) -> dict[str, Any]:
    if not _bool(s.settings.get("push_to_hub", False)):
        raise Ignored("push_to_hub is off")
    return {"hub.repo_id": str(v)}


def _optimizer(v: Any, s: Scope) -> dict[str, Any]:
    name = str(v).lower()
    base = name if name in OPTIMIZERS else name.removesuffix("-paged")  # paged 8-bit ones exist here too
    if base not in OPTIMIZERS:
        raise NotConverted(f"no equivalent; we translate {', '.join(OPTIMIZERS)} (and bnb -paged variants)")
    ours, beta1, beta2, eps, decay = OPTIMIZERS[base]
    if base != name:
        s.note(f"optimizer {name}: same update as {base}, without paged (CPU-offloaded) states")
    out = {"train.optimizer": ours, "train.adam_beta1": beta1, "train.adam_beta2": beta2, "train.weight_decay": decay}
    if eps is not None:
        out["train.adam_epsilon"] = eps
    if ours == "adamw_bf16":
        out["lora.dtype"] = "bf16"  # SimpleTuner's adamw_bf16 trains bf16 weights: pure-bf16 LoRA
    return out


def _optimizer_config(v: Any, s: Scope) -> dict[str, Any]:
    """SimpleTuner's "eps=1e-6,weight_decay=0.0" (or a JSON object) overrides the optimizer's defaults."""
    pairs = v if isinstance(v, dict) else dict(p.split("=", 1) for p in str(v).split(",") if "=" in p)
    ours = {"eps": "train.adam_epsilon", "weight_decay": "train.weight_decay"}
    out: dict[str, Any] = {}
    for key, value in pairs.items():
        if key in ours:
            out[ours[key]] = float(value)
        elif key == "betas" and isinstance(value, list) and len(value) == 2:
            out["train.adam_beta1"], out["train.adam_beta2"] = float(value[0]), float(value[1])
        else:
            s.conv.not_converted.append(f"{s.label('optimizer_config.' + key, value)} (no such optimizer setting "
                                        "here: we set betas, eps and weight_decay)")
    return out


def _beta(n: int) -> Rule:
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        if "optimizer_config" in s.settings:
            raise Ignored("SimpleTuner ignores it when optimizer_config is set")
        return {f"train.adam_beta{n}": float(v)}
    return rule


def _max_grad_norm(v: Any, s: Scope) -> dict[str, Any]:
    return {"train.max_grad_norm": float(v) if float(v) > 0 else None}  # SimpleTuner's 0 disables clipping


def _prompt_library(v: Any, s: Scope) -> dict[str, Any]:
    """user_prompt_library is a JSON object {name: prompt}, relative to SimpleTuner's folder (config/'s parent)."""
    given = Path(str(v)).expanduser()
    tried = [given] if given.is_absolute() else [s.folder.parent / given, s.folder / given, Path.cwd() / given]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise NotConverted(f"file not found (looked for {', '.join(map(str, tried))}): add its prompts to "
                           "validation.prompts")
    try:
        library = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NotConverted(f"{found} is not a JSON object of prompts ({e})") from None
    if not isinstance(library, dict):
        raise NotConverted(f"{found} is not a JSON object of prompts")
    prompts = [p for p in library.values() if isinstance(p, str)]
    s.note(f"user_prompt_library: {len(prompts)} prompt(s) from {found} added to validation.prompts")
    return {"validation.prompts": [*s.out.get("validation.prompts", []), *prompts]}


def _reports_wandb(settings: dict[str, Any]) -> bool:
    return bool({"wandb", "all"} & {x.strip().lower() for x in str(settings.get("report_to", "")).split(",")})


def _report_to(v: Any, s: Scope) -> dict[str, Any]:
    others = sorted({x.strip().lower() for x in str(v).split(",")} - {"wandb", "all", "none", "simpletuner", ""})
    if others:
        s.conv.not_converted.append(f"{s.label('report_to', others)} (we write metrics.jsonl, and W&B if asked)")
    if not _reports_wandb(s.settings):
        return {}
    return {"wandb.project": str(s.settings.get("tracker_project_name", "simpletuner"))}  # SimpleTuner's default


def _wandb(key: str) -> Rule:
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        if not _reports_wandb(s.settings):
            raise NotConverted("report_to does not include wandb: this job makes no W&B run")
        return {key: str(v)}
    return rule


def _in_pixels(v: Any, s: Scope) -> int:
    """A size in SimpleTuner's resolution unit -> ours: megapixels (resolution_type area) become the side of a
    square of that area, as our pixel_area."""
    if str(s.settings.get("resolution_type", "pixel_area")) == "area":
        return round(math.sqrt(float(v) * 1e6))
    return _int(v)


def _resolution(v: Any, s: Scope) -> dict[str, Any]:
    ours = _in_pixels(v, s)
    if str(s.settings.get("resolution_type")) == "area":
        s.note(f"resolution {v} megapixels (resolution_type area) becomes {ours} with resolution_type pixel_area")
    return {"resolution": ours}


def _size_key(key: str) -> Rule:
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        return {} if float(v) == 0 else {key: _in_pixels(v, s)}
    return rule


def _sizes(v: Any) -> str:
    parse_resolutions(str(v))  # a size we cannot sample (not WxH, not /16) is listed instead of failing the job
    return str(v)


def _caption_strategy(v: Any, s: Scope) -> dict[str, Any]:
    if v not in ("filename", "textfile", "instanceprompt"):
        raise NotConverted("captions come from a .txt beside each image, else the file name (textfile)")
    return {"caption_strategy": v}


# --- the tables ------------------------------------------------------------------------------------------------

# Legacy names SimpleTuner still accepts, read as the current ones
ALIASES = {"checkpointing_steps": "checkpoint_step_interval", "validation_steps": "validation_step_interval",
           "flux_schedule_shift": "flow_schedule_shift", "flux_schedule_auto_shift": "flow_schedule_auto_shift",
           "flux_use_uniform_schedule": "flow_use_uniform_schedule",
           "flow_matching_sigmoid_scale": "flow_sigmoid_scale"}
# config.json keys that are every data set's default in SimpleTuner; convert_dataset applies them
DATASET_GLOBALS = ("resolution", "resolution_type", "caption_strategy", "instance_prompt", "minimum_image_size",
                   "maximum_image_size", "target_downsample_size")
CACHE_WHY = "SimpleTuner's own cache layout; ours is data.cache_dir, keyed by everything that changes an entry"
LOADER_WHY = "a SimpleTuner data-loader or cache-writer setting; Ray Data schedules our caching"
LAUNCH_WHY = "an accelerate launch setting: Ray places the workers (train.num_workers, the cluster file)"
NO_CHANGE = "text encoders are not quantised here; model.text_encoder_dtype picks their dtype"

# Applied in this order, so a later rule may refine an earlier one (validation_disable after validation_prompt).
CONFIG_RULES: dict[str, Rule] = {
    "model_family": lambda v, s: {},  # checked at the door: sd3 only
    "model_type": only(lambda v: v == "lora", "raytune_sd3 trains LoRA only: this job trains a LoRA"),
    "pretrained_model_name_or_path": to("model.pretrained", str),
    "model_flavour": _flavour,
    "aspect_bucket_alignment": to("data.bucket_alignment", _int),
    "aspect_bucket_rounding": ignore("buckets here are exact sizes (width x height), not rounded aspect ratios"),
    "revision": to("model.revision", str),
    "mixed_precision": _mixed_precision,
    "base_model_precision": choice("model.quantize", BASE_PRECISION, "we quantise with optimum-quanto (int8-, "
                                   "int4-, int2- or fp8-quanto) or bitsandbytes nf4 (nf4-bnb)"),
    "base_model_default_dtype": _base_dtype,
    **{f"text_encoder_{i}_precision": only(lambda v: v == "no_change", NO_CHANGE) for i in (1, 2, 3)},
    "lora_type": only(lambda v: str(v).lower() == "standard", "LyCORIS is not supported: this job trains a LoRA"),
    "lora_rank": to("lora.rank", _int),
    "lora_alpha": to("lora.alpha", float),
    "lora_dropout": to("lora.dropout", float),
    "peft_lora_target_modules": to("lora.targets", lambda v: [str(x) for x in (json.loads(v) if isinstance(v, str)
                                                                               else v)]),  # JSON, as SimpleTuner
    "lora_init_type": only(lambda v: v == "default", "LoRA starts with peft's default init here"),
    "use_dora": only(lambda v: not _bool(v), "DoRA is not supported"),
    "tokenizer_max_length": _t5_length,
    "t5_padding": choice("text.t5_padding", {"zero": "zero", "unmodified": "unmodified"}, "zero or unmodified"),
    "sd3_clip_uncond_behaviour": choice("text.uncond", {"empty_string": "empty_string", "zero": "zero"},
                                        "text.uncond is empty_string or zero"),
    "sd3_t5_uncond_behaviour": _t5_uncond,
    "caption_dropout_probability": to("data.caption_dropout", float),
    "vae_batch_size": to("data.encode_batch_size", _int),
    **{k: (lambda v, s: {}) for k in DATASET_GLOBALS},
    "flow_schedule_shift": _shift,
    "flow_schedule_auto_shift": flag("flow.shift", "auto"),
    "flow_use_uniform_schedule": flag("flow.sigma_sampling", "uniform"),
    "flow_use_beta_schedule": only(lambda v: not _bool(v), "flow.sigma_sampling is logit_normal, uniform or mode"),
    "flow_sigmoid_scale": to("flow.logit_std", float),
    "flow_matching_loss": choice("flow.prediction", {"compatible": "velocity", "diffusers": "x0"},
                                 "flow.prediction is velocity (SimpleTuner's compatible) or x0 (its diffusers)"),
    "output_dir": path("output_dir"),
    "num_processes": to("train.num_workers", _int),
    "train_batch_size": to("train.batch_size", _int),
    "gradient_accumulation_steps": to("train.grad_accum", _int),
    "max_train_steps": _max_steps,
    "num_train_epochs": _epochs,
    "learning_rate": to("train.learning_rate", float),
    "lr_scheduler": choice("train.lr_scheduler", SCHEDULERS, "train.lr_scheduler is constant, cosine or linear "
                           "after a linear warmup"),
    "lr_warmup_steps": to("train.lr_warmup_steps", _int),
    "optimizer": _optimizer,
    "optimizer_config": _optimizer_config,
    "optimizer_beta1": _beta(1),
    "optimizer_beta2": _beta(2),
    **{k: ignore("SimpleTuner passes it to DeepSpeed's optimizer only")
       for k in ("adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay")},
    "max_grad_norm": _max_grad_norm,
    "grad_clip_method": choice("train.grad_clip", {"norm": "norm", "value": "value"}, "we clip by norm or value"),
    "gradient_checkpointing": to("train.gradient_checkpointing", _bool),
    "seed": to("train.seed", _int),
    "checkpoint_step_interval": to("train.checkpoint_every", _int),
    "checkpoints_total_limit": to("train.keep_checkpoints", _int),
    "validation_prompt": lambda v, s: {"validation.prompts": [str(v)]},
    "user_prompt_library": _prompt_library,
    "validation_disable": flag("validation.prompts", []),
    "validation_step_interval": to("validation.every_steps", _int),
    "validation_resolution": to("validation.resolution", _sizes),
    "validation_guidance": to("validation.guidance", float),
    "validation_num_inference_steps": to("validation.steps", _int),
    "validation_seed": to("validation.seed", _int),
    "validation_guidance_skip_layers": to("validation.skip_layers", lambda v: [_int(x) for x in _list(v)]),
    "validation_guidance_skip_layers_start": to("validation.skip_layer_start", float),
    "validation_guidance_skip_layers_stop": to("validation.skip_layer_stop", float),
    "validation_guidance_skip_scale": to("validation.skip_layer_scale", float),
    "num_validation_images": only(lambda v: _int(v) == 1, "one image per prompt and resolution here"),
    "validation_negative_prompt": unsupported("validation samples use the unconditional embedding, no negative prompt"),
    "report_to": _report_to,
    "push_to_hub": _push_to_hub,
    "hub_model_id": _hub_model_id,
    "model_card_private": to("hub.private", _bool),
    "push_checkpoints_to_hub": only(lambda v: not _bool(v), "the final LoRA is uploaded, with its card; checkpoints "
                                    "stay in output_dir"),
    "tracker_project_name": _wandb("wandb.project"),
    "tracker_run_name": _wandb("wandb.name"),
    "data_backend_config": ignore("the data sets come from the multidatabackend.json on the command line"),
    "resume_from_checkpoint": ignore("a run resumes from its last Ray Train checkpoint by itself"),
    "logging_dir": ignore("metrics, validation images and offline W&B runs live under output_dir"),
    **{k: ignore(CACHE_WHY) for k in ("cache_dir", "cache_dir_text", "cache_dir_vae", "preserve_data_backend_cache")},
    **{k: ignore(LOADER_WHY) for k in ("write_batch_size", "read_batch_size", "text_encoder_batch_size",
                                       "image_processing_batch_size", "max_workers", "aspect_bucket_worker_count",
                                       "dataloader_prefetch", "skip_file_discovery", "metadata_update_interval")},
    **{k: ignore(LAUNCH_WHY) for k in ("num_machines", "machine_rank", "main_process_ip", "main_process_port",
                                       "same_network", "accelerate_config", "accelerate_extra_args")},
}

DATASET_DEFAULTS = {"resolution": 1024, "resolution_type": "pixel_area", "caption_strategy": "filename",
                    "crop": False, "crop_aspect": "square", "crop_style": "random"}  # SimpleTuner's, per data set
DATASET_RULES: dict[str, Rule] = {
    "id": to("id", str),
    "type": to("type", str),  # only local data sets get here
    "dataset_type": lambda v, s: {},
    "disabled": lambda v, s: {},
    "instance_data_dir": path("instance_data_dir"),
    "caption_strategy": _caption_strategy,
    "instance_prompt": to("instance_prompt", str),
    "resolution": _resolution,
    "resolution_type": choice("resolution_type", {"pixel_area": "pixel_area", "pixel": "pixel", "area": "pixel_area"},
                              "resolution_type is pixel_area, pixel or area"),
    "crop": to("crop", _bool),
    "crop_style": choice("crop_style", {"center": "center", "centre": "center", "corner": "corner",
                                        "random": "random"}, "no face detection here: center, corner or random"),
    "crop_aspect": choice("crop_aspect", {a: a for a in ("square", "preserve", "closest", "random")},
                          "crop_aspect is square, preserve, closest or random"),
    "crop_aspect_buckets": to("crop_aspect_buckets", lambda v: [float(x) for x in _list(v)]),
    "minimum_image_size": _size_key("minimum_image_size"),
    "maximum_image_size": _size_key("maximum_image_size"),
    "target_downsample_size": _size_key("target_downsample_size"),
    "repeats": lambda v, s: {"repeats": _int(v)} if _int(v) else {},
    "is_regularisation_data": lambda v, s: {"is_regularisation_data": True} if _bool(v) else {},
    "probability": only(lambda v: float(v) == 1, "every data set's batches are shuffled together here: weight a "
                                                 "data set by its number of images and repeats instead"),
    **{k: ignore(CACHE_WHY) for k in ("cache_dir_vae", "cache_dir", "text_embeds", "image_embeds", "hash_filenames",
                                      "preserve_data_backend_cache", "vae_cache_clear_each_epoch")},
    **{k: ignore(LOADER_WHY) for k in ("metadata_backend", "skip_file_discovery", "write_batch_size")},
}

# SimpleTuner's defaults (current releases) that differ from ours: noted when config.json leaves the key out
DEFAULT_DIFFERENCES = {"num_processes": (1, "train.num_workers"), "mixed_precision": ("bf16", "train.mixed_precision"),
                       "optimizer": ("adamw_bf16", "train.optimizer"), "lora_dropout": (0.1, "lora.dropout"),
                       "max_grad_norm": (2.0, "train.max_grad_norm"), "grad_clip_method": ("value", "train.grad_clip"),
                       "gradient_checkpointing": (True, "train.gradient_checkpointing"),
                       "validation_guidance": (7.5, "validation.guidance"),
                       "validation_num_inference_steps": (30, "validation.steps")}


def _is_secret(key: str, value: Any) -> bool:
    return bool(SECRET_KEY.search(key) or SECRET_VALUE.search(json.dumps(value, default=str)))


# --- converting ------------------------------------------------------------------------------------------------


def _drop_secrets(settings: dict[str, Any], where: str, conv: Conversion) -> dict[str, Any]:
    """The settings without credentials; each dropped key is reported by name, never with its value."""
    kept = {}
    for key, value in settings.items():
        if _is_secret(key, value):
            conv.secrets.append(f"{where}{key} (a credential is never copied into a job file: give it to the "
                                "cluster as an environment variable, e.g. HF_TOKEN or WANDB_API_KEY)")
        else:
            kept[key] = value
    return kept


def _apply(rules: dict[str, Rule], scope: Scope) -> None:
    """List each key no rule knows, then run every rule whose key is set, in table order."""
    off = []
    for key, value in scope.settings.items():
        if key not in rules and not _is_off(value):
            scope.conv.not_converted.append(f"{scope.label(key, value)} (no equivalent in raytune_sd3)")
        elif key not in rules:
            off.append(key)
    for key, rule in rules.items():
        value = scope.settings.get(key)
        if value is None or value == "":
            continue  # SimpleTuner passes no argument for null or empty
        try:
            scope.out.update(rule(value, scope))
            scope.conv.converted += 1
        except NotConverted as e:
            scope.conv.not_converted.append(f"{scope.label(key, value)} ({e})")
        except Ignored as e:
            scope.conv.ignored.append(f"{scope.label(key, value)} ({e})")
        except (ValueError, TypeError) as e:
            scope.conv.not_converted.append(f"{scope.label(key, value)} (cannot use the value: {e})")
    if off:
        scope.note(f"false or null, so nothing to convert: {', '.join(off)}")


def convert_dataset(entry: dict[str, Any], config: dict[str, Any], conv: Conversion, where: str) -> dict | None:
    """One multidatabackend.json entry -> our data set (a dict), or None for an entry that is not an image folder."""
    entry = _drop_secrets(entry, f"{where}.", conv)
    kind, backend = str(entry.get("dataset_type", "image")), str(entry.get("type", "local"))
    if str(entry.get("disabled", entry.get("disable", False))).lower() in ("true", "1", "yes"):
        conv.ignored.append(f"{where} (disabled: SimpleTuner skips it too)")
        return None
    if kind in ("text_embeds", "image_embeds"):
        for key, value in entry.items():
            if key not in ("id", "type", "dataset_type", "disabled"):
                conv.ignored.append(f"{where}.{key} = {_fmt(value)} (a setting of SimpleTuner's {kind} cache; "
                                    "ours is data.cache_dir, keyed by everything that changes an entry)")
        return None
    if kind != "image" or backend != "local" or not entry.get("instance_data_dir"):
        conv.not_converted.append(f"{where} (dataset_type {kind}, type {backend}: we train on local image folders "
                                  "only, type local with instance_data_dir)")
        return None
    explicit = {**{k: config[k] for k in DATASET_GLOBALS if config.get(k) not in (None, "")}, **entry}
    settings = {**DATASET_DEFAULTS, **explicit}
    if settings["crop"] is False:  # SimpleTuner's crop style and aspect only matter when it crops
        settings = {k: v for k, v in settings.items() if k in explicit or k not in ("crop_style", "crop_aspect")}
    scope = Scope(settings, conv, where=f"{where}.", defaults=set(DATASET_DEFAULTS) - set(explicit))
    _apply(DATASET_RULES, scope)
    return scope.out


def _read_json(path: Path, kind: type, what: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e}); expected {what}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                           f"expected {what}") from None
    if not isinstance(data, kind):
        raise ConvertError(f"{path}: not {what}")
    return data


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.batch_size": 4} -> {"train": {"batch_size": 4}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return nested


def convert_simpletuner(config_path: str | Path, backends_path: str | Path) -> Conversion:
    """SimpleTuner's config.json + multidatabackend.json -> a Conversion whose `job` validates as a JobConfig.

    Raises ConvertError (naming the file) for an unreadable input, one that is not SimpleTuner's, or one that does
    not make a valid job."""
    config_path, backends_path = Path(config_path), Path(backends_path)
    conv = Conversion()
    raw = _read_json(config_path, dict, "a SimpleTuner config.json (a JSON object of options such as model_family)")
    backends = _read_json(backends_path, list, "a SimpleTuner multidatabackend.json (a JSON list of data sets)")
    config: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(str(key).lstrip("-"), str(key).lstrip("-"))  # "--key" or "key", current or legacy name
        if name in config and not _is_secret(name, config[name]):
            conv.ignored.append(f"{name} = {_fmt(config[name])} (set again as {key}: the later value counts, as in "
                                "SimpleTuner)")
        config[name] = value
    if not config.keys() & {"model_family", "pretrained_model_name_or_path", "model_flavour"}:
        raise ConvertError(f"{config_path}: not a SimpleTuner config.json (it sets none of model_family, "
                           "pretrained_model_name_or_path, model_flavour)")
    if str(config.get("model_family", "sd3")).lower() != "sd3":
        raise ConvertError(f"{config_path}: model_family {config['model_family']!r}: raytune_sd3 trains Stable "
                           "Diffusion 3 / 3.5 only (model_family sd3)")
    if not all(isinstance(b, dict) and b.get("id") for b in backends):
        raise ConvertError(f"{backends_path}: not a SimpleTuner multidatabackend.json (every entry is an object "
                           "with an id)")

    config = _drop_secrets(config, "", conv)
    scope = Scope(config, conv, folder=config_path.parent)
    _apply(CONFIG_RULES, scope)
    if "model.pretrained" not in scope.out:
        scope.out["model.pretrained"] = FLAVOURS["medium"]
        scope.note(f"no model named: SimpleTuner's default flavour, medium ({FLAVOURS['medium']})")
    if "output_dir" not in scope.out:
        scope.out["output_dir"] = "simpletuner-results"
        scope.note("output_dir not set: SimpleTuner's default, simpletuner-results (use shared storage on a cluster)")
    datasets = [ds for b in backends if (ds := convert_dataset(b, config, conv, f"{backends_path.name}[{b['id']}]"))]
    if not datasets:
        raise ConvertError(f"{backends_path}: no enabled local image data set to convert (type local with "
                           "instance_data_dir)")
    job = _nest(scope.out)
    job.setdefault("data", {})["datasets"] = datasets
    try:
        cfg = load_job(raw=copy.deepcopy(job))
    except ConfigError as e:
        raise ConvertError(f"{config_path} + {backends_path}: the converted job is not valid:\n{e}") from None
    for key, (theirs, ours) in DEFAULT_DIFFERENCES.items():
        value: Any = cfg
        for part in ours.split("."):
            value = getattr(value, part)
        if key not in config and str(value).lower() != str(theirs).lower():
            conv.notes.append(f"{key} not set: SimpleTuner's default is {_fmt(theirs)}, this job has "
                              f"{ours} = {_fmt(value)}")
    conv.job = job
    return conv


def render(conv: Conversion, sources: list[Path]) -> str:
    """The job file: the report as YAML comments, then the validated job (every default filled in)."""
    head = [f"Converted from SimpleTuner ({' + '.join(map(str, sources))}) by python -m raytune_sd3.convert.",
            f"{conv.converted} settings converted. A setting not converted keeps raytune_sd3's default (in the job "
            "below).", "Read the lines below, then run: python -m raytune_sd3.check THIS_FILE", ""]
    comments = "".join(f"# {line}".rstrip() + "\n" for line in head + conv.report())
    return comments + "\n" + dump_job(JobConfig.model_validate(conv.job))


def write_atomic(path: Path, text: str) -> None:
    """Write through a temp file in the same folder and os.replace: a reader never sees half a job."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a job file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytune_sd3.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    st = sources.add_parser("simpletuner", help="SimpleTuner's config.json + multidatabackend.json")
    st.add_argument("config", type=Path, metavar="CONFIG.json", help="SimpleTuner's config.json (keys with or "
                    "without a leading --)")
    st.add_argument("backends", type=Path, metavar="MULTIDATABACKEND.json", help="SimpleTuner's data sets")
    st.add_argument("-o", "--output", type=Path, required=True, help="the job YAML to write, e.g. jobs/mine.yaml")
    st.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    args = parser.parse_args(argv)
    try:
        conv = convert_simpletuner(args.config, args.backends)
        if args.output.exists() and not args.force:
            raise ConvertError(f"{args.output}: exists; pass --force to overwrite it")
        write_atomic(args.output, render(conv, [args.config, args.backends]))
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.output}: cannot write it ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {conv.converted} settings converted, {len(conv.not_converted)} not converted, "
          f"{len(conv.ignored)} ignored, {len(conv.secrets)} secrets dropped")
    for line in conv.report():
        print(f"  {line}")
    print(f"next: python -m raytune_sd3.check {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
