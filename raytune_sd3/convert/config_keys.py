"""config.json's keys -> our job's: the model, precision, text encoders, flow, steps, EMA, validation, hub and
tracking rules, the table CONFIG_RULES that applies them in order (with the optimizer, adapter and scheduled-sampling
slices from their modules), SimpleTuner's defaults for the keys a config leaves out, and its legacy key names."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from raytune_sd3.config import is_uri, parse_resolutions
from raytune_sd3.convert.adapter import ADAPTER_RULES
from raytune_sd3.convert.datasets import CACHE_WHY, DATASET_GLOBALS, LOADER_WHY
from raytune_sd3.convert.optimizer import OPTIMIZER_RULES
from raytune_sd3.convert.report import Conversion, Ignored, Never, NotConverted, Refused
from raytune_sd3.convert.rules import (
    Rule,
    Scope,
    as_bool,
    as_int,
    as_list,
    choice,
    flag,
    ignore,
    is_off,
    never_when_on,
    only,
    path,
    refuse_unless,
    to,
)
from raytune_sd3.convert.scheduled_sampling import ROLLOUT_RULES
from raytune_sd3.data.discovery import IMAGE_EXTS
from raytune_sd3.data.files import redacted

FLAVOURS = {"medium": "stabilityai/stable-diffusion-3.5-medium", "large": "stabilityai/stable-diffusion-3.5-large"}
BASE_PRECISION = {"no_change": "none", "int8-quanto": "int8", "int4-quanto": "int4", "int2-quanto": "int2",
                  "fp8-quanto": "fp8", "nf4-bnb": "nf4"}


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


def _model_type(v: Any, s: Scope) -> dict[str, Any]:
    if str(v) == "lora":
        return {}
    if str(v) == "full":
        raise Refused("SimpleTuner fine-tunes the whole transformer; raytune_sd3 trains LoRA only (--lossy: a LoRA)")
    raise Never(f"model_type {v!r}: raytune_sd3 trains LoRA on SD3 only (model_type lora)")


def _base_precision(v: Any, s: Scope) -> dict[str, Any]:
    if str(v) == "fp8-quanto":  # SimpleTuner's SD3 class refuses it too
        raise Never("SimpleTuner does not train SD3 with fp8-quanto either: use int8-quanto")
    if str(v) not in BASE_PRECISION:
        raise NotConverted("we quantise with optimum-quanto (int8-, int4- or int2-quanto) or bitsandbytes nf4 "
                           "(nf4-bnb)")
    return {"model.quantize": BASE_PRECISION[str(v)]}


def _alignment(v: Any, s: Scope) -> dict[str, Any]:
    if as_int(v) != 64:
        raise Ignored("SimpleTuner's SD3 model forces 64 (MM-DiT), and so does this job (data.bucket_alignment 64)")
    return {"data.bucket_alignment": 64}


def _t5_length(v: Any, s: Scope) -> dict[str, Any]:
    if as_int(v) > 154:
        s.note(f"tokenizer_max_length {v} becomes 154, as SimpleTuner caps it for SD3")
    return {"text.t5_max_length": min(as_int(v), 154)}


def _t5_uncond(v: Any, s: Scope) -> dict[str, Any]:
    if v != s.settings.get("sd3_clip_uncond_behaviour", "empty_string"):
        raise NotConverted("one unconditional embedding serves all three encoders here (text.uncond)")
    return {}


def _shift(v: Any, s: Scope) -> dict[str, Any]:
    if as_bool(s.settings.get("flow_schedule_auto_shift", False)):
        if "flow_schedule_shift" in s.defaults:
            return {}
        raise Ignored("flow_schedule_auto_shift overrides it, as in SimpleTuner")
    return {"flow.shift": float(v) if float(v) > 0 else 1.0}  # SimpleTuner's 0 = no shift = our 1.0


def _max_steps(v: Any, s: Scope) -> dict[str, Any]:
    if as_int(v) <= 0:
        raise Ignored("0 makes SimpleTuner train by num_train_epochs, converted to steps below")
    return {"train.max_steps": as_int(v)}


def _epochs(v: Any, s: Scope) -> dict[str, Any]:
    if as_int(s.settings.get("max_train_steps") or 0) > 0:
        if as_int(v) == 0 or "num_train_epochs" in s.defaults:
            return {}  # SimpleTuner wants 0 beside max_train_steps
        raise Ignored("max_train_steps takes precedence, as in SimpleTuner")
    return {}  # turned into train.max_steps once the data sets are counted (epoch_steps)


def epoch_steps(epochs: int, datasets: list[dict[str, Any]], train: Any, conv: Conversion) -> int | None:
    """SimpleTuner's epochs as our optimizer steps: every image x (repeats + 1) x resolutions, once per epoch, in
    global batches; None when a data set's folder cannot be counted here."""
    images = 0
    for ds in datasets:
        # A bucket, a table or shards (no instance_data_dir) are not counted here: only a folder on this machine.
        given = ds.get("instance_data_dir")
        folder = Path(given).expanduser() if given and not is_uri(str(given)) else None
        if folder is None or not folder.is_dir():
            conv.not_converted.append(
                f"num_train_epochs = {epochs} (SimpleTuner trains epochs when max_train_steps is not set; "
                f"{redacted(str(given or ds.get('urls') or ds.get('dataset') or ds['id']))} is not a folder here to "
                f"count its images, so this job trains train.max_steps = "
                f"{train.max_steps}: set it to epochs x images x (repeats + 1) / global batch, or convert where "
                "the images are)")
            return None
        count = sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        sizes = ds.get("resolution", 1024)
        images += count * (int(ds.get("repeats", 0)) + 1) * (len(sizes) if isinstance(sizes, list) else 1)
    workers = train.num_workers if isinstance(train.num_workers, int) else 1
    batch = (train.batch_size if isinstance(train.batch_size, int) else 1) * train.grad_accum * workers
    steps = max(1, math.ceil(images / batch) * epochs)
    conv.defaults.append(f"num_train_epochs = {epochs}: {images} images per epoch (repeats included) in global "
                         f"batches of {batch} -> train.max_steps = {steps}")
    return steps


SIMPLETUNER_EMA_DECAY = 0.995  # SimpleTuner's ema_decay when use_ema is on and ema_decay is left out


def _use_ema(v: Any, s: Scope) -> dict[str, Any]:
    if not as_bool(v):
        return {}
    if "ema_decay" not in s.settings:
        s.note(f"use_ema without ema_decay: SimpleTuner's default {SIMPLETUNER_EMA_DECAY} -> train.ema_decay")
    return {"train.ema_decay": float(s.settings.get("ema_decay", SIMPLETUNER_EMA_DECAY))}


def _needs_ema(rule: Rule) -> Rule:
    """An EMA setting: read only with use_ema on, as SimpleTuner does."""
    def wrapped(v: Any, s: Scope) -> dict[str, Any]:
        if not as_bool(s.settings.get("use_ema", False)):
            raise Ignored("only read with use_ema on")
        return rule(v, s)
    return wrapped


def _ema_validation(v: Any, s: Scope) -> dict[str, Any]:
    if str(v) == "comparison":  # SimpleTuner samples both; we sample one set
        s.note("ema_validation comparison: validation images are sampled with the trained weights only here "
               "(validation.use_ema: true samples the EMA's instead); both LoRA files are saved")
        return {}
    return {"validation.use_ema": str(v) == "ema_only"}


def _push_to_hub(v: Any, s: Scope) -> dict[str, Any]:
    if as_bool(v) and not s.settings.get("hub_model_id"):
        raise NotConverted("set hub.repo_id (owner/name, or a name under the token's account) to upload")
    return {}


def _hub_model_id(v: Any, s: Scope) -> dict[str, Any]:
    if not as_bool(s.settings.get("push_to_hub", False)):
        raise Ignored("push_to_hub is off")
    return {"hub.repo_id": str(v)}


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


def _sizes(v: Any) -> str:
    parse_resolutions(str(v))  # a size we cannot sample (not WxH, not /16) is listed instead of failing the job
    return str(v)


# Legacy names SimpleTuner still accepts, read as the current ones
ALIASES = {"checkpointing_steps": "checkpoint_step_interval", "validation_steps": "validation_step_interval",
           "flux_schedule_shift": "flow_schedule_shift", "flux_schedule_auto_shift": "flow_schedule_auto_shift",
           "flux_use_uniform_schedule": "flow_use_uniform_schedule",
           "flow_matching_sigmoid_scale": "flow_sigmoid_scale"}
LAUNCH_WHY = "an accelerate launch setting: Ray places the workers (train.num_workers, the cluster file)"
NO_CHANGE = "text encoders are not quantised here; model.text_encoder_dtype picks their dtype"

# Applied in this order, so a later rule may refine an earlier one (validation_disable after validation_prompt).
CONFIG_RULES: dict[str, Rule] = {
    "model_family": lambda v, s: {},  # checked at the door: sd3 only
    "model_type": _model_type,
    "controlnet": never_when_on("raytune_sd3 trains no ControlNet: a plain LoRA would ignore the conditioning"),
    "twinflow_enabled": never_when_on("raytune_sd3 trains no TwinFlow model"),
    "distillation_method": never_when_on("raytune_sd3 trains no distilled model"),
    "use_ema": _use_ema,
    "ema_decay": _needs_ema(lambda v, s: {"train.ema_decay": float(v)}),
    "ema_validation": _needs_ema(_ema_validation),
    "ema_update_interval": _needs_ema(only(lambda v: is_off(v) or as_int(v) == 1,
                                           "the EMA is updated after every optimizer step here")),
    **{k: _needs_ema(ignore("the EMA lives on each training worker's device (in the memory estimate)"))
       for k in ("ema_device", "ema_cpu_only", "ema_foreach_disable")},
    **ROLLOUT_RULES,
    "loss_type": refuse_unless(lambda v: str(v) == "l2", "our loss is the mean squared error (SimpleTuner's l2)"),
    "snr_gamma": refuse_unless(lambda v: float(v) == 0, "no min-SNR loss weighting here (flow.weighting none, "
                               "sigma_sqrt or cosmap)"),
    "train_text_encoder": refuse_unless(lambda v: not as_bool(v), "the text encoders stay frozen here"),
    "pretrained_model_name_or_path": to("model.pretrained", str),
    "model_flavour": _flavour,
    "aspect_bucket_alignment": _alignment,
    "aspect_bucket_rounding": ignore("buckets here are exact sizes (width x height), not rounded aspect ratios"),
    "revision": to("model.revision", str),
    "mixed_precision": _mixed_precision,
    "base_model_precision": _base_precision,
    "base_model_default_dtype": _base_dtype,
    **{f"text_encoder_{i}_precision": only(lambda v: v == "no_change", NO_CHANGE) for i in (1, 2, 3)},
    **ADAPTER_RULES,
    "tokenizer_max_length": _t5_length,
    "t5_padding": choice("text.t5_padding", {"zero": "zero", "unmodified": "unmodified"}, "zero or unmodified"),
    "sd3_clip_uncond_behaviour": choice("text.uncond", {"empty_string": "empty_string", "zero": "zero"},
                                        "text.uncond is empty_string or zero"),
    "sd3_t5_uncond_behaviour": _t5_uncond,
    "caption_dropout_probability": to("data.caption_dropout", float),
    "vae_batch_size": to("data.encode_batch_size", as_int),
    **{k: (lambda v, s: {}) for k in DATASET_GLOBALS},
    "flow_schedule_shift": _shift,
    "flow_schedule_auto_shift": flag("flow.shift", "auto"),
    "flow_use_uniform_schedule": flag("flow.sigma_sampling", "uniform"),
    "flow_use_beta_schedule": refuse_unless(lambda v: not as_bool(v), "flow.sigma_sampling is logit_normal, "
                                            "uniform or mode"),
    "flow_sigmoid_scale": to("flow.logit_std", float),
    "flow_matching_loss": choice("flow.prediction", {"compatible": "velocity", "diffusers": "x0"},
                                 "flow.prediction is velocity (SimpleTuner's compatible) or x0 (its diffusers)"),
    "output_dir": path("output_dir"),
    "num_processes": to("train.num_workers", as_int),
    "train_batch_size": to("train.batch_size", as_int),
    "gradient_accumulation_steps": to("train.grad_accum", as_int),
    "max_train_steps": _max_steps,
    "num_train_epochs": _epochs,
    **OPTIMIZER_RULES,
    "gradient_checkpointing": to("train.gradient_checkpointing", as_bool),
    "seed": to("train.seed", as_int),
    "checkpoint_step_interval": to("train.checkpoint_every", as_int),
    "checkpoints_total_limit": to("train.keep_checkpoints", as_int),
    "validation_prompt": lambda v, s: {"validation.prompts": [str(v)]},
    "user_prompt_library": _prompt_library,
    "validation_disable": flag("validation.prompts", []),
    "validation_step_interval": to("validation.every_steps", as_int),
    "validation_resolution": to("validation.resolution", _sizes),
    "validation_guidance": to("validation.guidance", float),
    "validation_num_inference_steps": to("validation.steps", as_int),
    "validation_seed": to("validation.seed", as_int),
    "validation_guidance_skip_layers": to("validation.skip_layers", lambda v: [as_int(x) for x in as_list(v)]),
    "validation_guidance_skip_layers_start": to("validation.skip_layer_start", float),
    "validation_guidance_skip_layers_stop": to("validation.skip_layer_stop", float),
    "validation_guidance_skip_scale": to("validation.skip_layer_scale", float),
    "num_validation_images": to("validation.num_images", as_int),
    "validation_negative_prompt": lambda v, s: {"validation.negative_prompt": str(v)} if str(v) else {},
    "report_to": _report_to,
    "push_to_hub": _push_to_hub,
    "hub_model_id": _hub_model_id,
    "model_card_private": to("hub.private", as_bool),
    "push_checkpoints_to_hub": only(lambda v: not as_bool(v), "the final LoRA is uploaded, with its card; checkpoints "
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

# What SimpleTuner trains SD3 with when its config leaves a setting out (its option registry, and its SD3 model
# class: T5 154 tokens, buckets aligned to 64), for every setting we have a knob for. Applied before the rules, so
# each is converted like a value the user wrote, and listed as a default.
SIMPLETUNER_DEFAULTS: dict[str, Any] = {
    "model_type": "full", "mixed_precision": "bf16", "optimizer": "adamw_bf16", "learning_rate": 4e-7,
    "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 0, "train_batch_size": 4,
    "gradient_accumulation_steps": 1, "num_processes": 1, "max_grad_norm": 2.0, "grad_clip_method": "value",
    "gradient_checkpointing": True, "num_train_epochs": 1, "checkpoint_step_interval": 500,
    "checkpoints_total_limit": 5, "lora_rank": 16, "lora_dropout": 0.1, "flow_schedule_shift": 3.0,
    "flow_sigmoid_scale": 1.0, "tokenizer_max_length": 154, "t5_padding": "unmodified",
    "sd3_clip_uncond_behaviour": "empty_string", "aspect_bucket_alignment": 64, "validation_step_interval": 100,
    "validation_guidance": 7.5, "validation_num_inference_steps": 30, "validation_resolution": "256",
}
