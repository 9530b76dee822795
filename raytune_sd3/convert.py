"""python -m raytune_sd3.convert simpletuner CONFIG MULTIDATABACKEND -o job.yaml [--lossy] [--force]

Turns a SimpleTuner SD3 setup (its config in any form SimpleTuner reads: config.json with or without `--` keys,
config.toml, config.env, the web UI's `_metadata` files; and the data sets it trains on) into our job YAML that
trains what SimpleTuner would have trained. A setting the config leaves out takes SimpleTuner's default (listed as
"default"). Every setting ends in one place: converted; "not converted" (validation or tracking we cannot express:
ours is used); "ignored" (meaningless here, e.g. SimpleTuner's cache folders); "dropped secret" (never copied); or
refused: a setting that changes what is trained (model type, adapter, EMA, loss, data) and has no equivalent here
stops the conversion unless --lossy is given (then it is listed as "lost"); ControlNet, TwinFlow, distillation and
data we cannot read are refused always. The lists are printed and written as comments atop the job, which is
validated like any job before it is written (atomically).

Exit status: 0 written (read the lists), 2 nothing written: an input is unreadable, not SimpleTuner's, refused, or
does not make a valid job.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from raytune_sd3 import atomic
from raytune_sd3.config import (
    MAX_LORA_RANK,
    OPTIMIZERS,
    POLYNOMIAL_LR_END,
    SECRET_KEY,
    SECRET_VALUE,
    ConfigError,
    JobConfig,
    dump_job,
    is_uri,
    load_job,
    parse_resolutions,
)
from raytune_sd3.data.discovery import IMAGE_EXTS
from raytune_sd3.data.files import redacted
from raytune_sd3.driver.cli import command_parser
from raytune_sd3.simpletuner_files import ConvertError, read_backends, read_config


class NotConverted(Exception):
    """A setting we cannot express; the message says why."""


class Refused(NotConverted):
    """A setting that changes what is trained and cannot be expressed: the conversion stops unless --lossy."""


class Never(Exception):
    """Something we do not train (ControlNet, TwinFlow, data we cannot read): the conversion always stops."""


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
    defaults: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # refused settings converted anyway (--lossy)
    refused: list[str] = field(default_factory=list)  # "FILE: setting (why)"
    never: list[str] = field(default_factory=list)

    def report(self) -> list[str]:
        return ([f"lost: {x}" for x in self.lost] + [f"not converted: {x}" for x in self.not_converted]
                + [f"default: {x}" for x in self.defaults] + [f"ignored: {x}" for x in self.ignored]
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
    source: Path = Path(".")  # the file the settings come from, named in a refusal
    data: bool = False  # a data set's settings: every one changes what is trained

    def label(self, key: str, value: Any) -> str:
        by_default = ", SimpleTuner's default" if key in self.defaults else ""
        return f"{self.where}{key} = {_fmt(value)}{by_default}"

    def note(self, text: str) -> None:
        self.conv.notes.append(f"{self.where}{text}")

    def refusal(self, label: str) -> str:
        """FILE: KEY = value (a data set's label starts with the file's name already)."""
        return f"{self.source.parent / label}" if self.data else f"{self.source}: {label}"


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


def refuse_unless(ok: Callable[[Any], bool], why: str) -> Rule:
    """A setting that changes what is trained: values where `ok` holds are what we train; any other is refused
    (converted without it only with --lossy)."""
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        if not ok(v):
            raise Refused(why)
        return {}
    return rule


def never_when_on(why: str) -> Rule:
    """A switch (or any value) for something we do not train: on or set, the conversion stops, --lossy or not."""
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        try:
            on = _bool(v)
        except ValueError:
            on = not _is_off(v)  # a method name, a conditioning block
        if on:
            raise Never(why)
        return {}
    return rule


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
SIMPLETUNER_OPTIMIZERS = {
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
    # SimpleTuner's prodigy is prodigy-plus-schedule-free (lr 1.0, betas (0.9, 0.99)); ours is prodigyopt's
    "prodigy": ("prodigy", 0.9, 0.99, 1e-8, 0.0),
    # SimpleTuner's (with Kahan summation for bf16 weights; its +no_kahan turns that off)
    "adamw_schedulefree": ("adamw_schedulefree", 0.9, 0.999, 1e-8, 1e-2),
    "adamw_schedulefree+aggressive": ("adamw_schedulefree", 0.9, 0.999, 1e-6, 1e-3),
    "adamw_schedulefree+no_kahan": ("adamw_schedulefree", 0.9, 0.999, 1e-6, 1e-3),
}
# Ours that no SimpleTuner optimizer maps to (tests/test_optim.py: every registry name is in one of the two)
NO_SIMPLETUNER_EQUIVALENT: tuple[str, ...] = ()
SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine", "linear": "linear",
              "polynomial": "polynomial"}
SIMPLETUNER_LR_END = 4e-7  # where SimpleTuner's polynomial schedule ends by default (its lr_end)
SIMPLETUNER_LR_POWER = 0.8  # its lr_power default
# optimizer_config keys of SimpleTuner's prodigy that are ours too (train.prodigy.*)
PRODIGY_SETTINGS = {"d_coef": float, "d0": float, "growth_rate": float, "safeguard_warmup": _bool,
                    "use_bias_correction": _bool}


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
    if _int(v) != 64:
        raise Ignored("SimpleTuner's SD3 model forces 64 (MM-DiT), and so does this job (data.bucket_alignment 64)")
    return {"data.bucket_alignment": 64}


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
        if "flow_schedule_shift" in s.defaults:
            return {}
        raise Ignored("flow_schedule_auto_shift overrides it, as in SimpleTuner")
    return {"flow.shift": float(v) if float(v) > 0 else 1.0}  # SimpleTuner's 0 = no shift = our 1.0


def _max_steps(v: Any, s: Scope) -> dict[str, Any]:
    if _int(v) <= 0:
        raise Ignored("0 makes SimpleTuner train by num_train_epochs, converted to steps below")
    return {"train.max_steps": _int(v)}


def _epochs(v: Any, s: Scope) -> dict[str, Any]:
    if _int(s.settings.get("max_train_steps") or 0) > 0:
        if _int(v) == 0 or "num_train_epochs" in s.defaults:
            return {}  # SimpleTuner wants 0 beside max_train_steps
        raise Ignored("max_train_steps takes precedence, as in SimpleTuner")
    return {}  # turned into train.max_steps once the data sets are counted (_epoch_steps)


def _epoch_steps(epochs: int, datasets: list[dict[str, Any]], train: Any, conv: Conversion) -> int | None:
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
    if not _bool(v):
        return {}
    if "ema_decay" not in s.settings:
        s.note(f"use_ema without ema_decay: SimpleTuner's default {SIMPLETUNER_EMA_DECAY} -> train.ema_decay")
    return {"train.ema_decay": float(s.settings.get("ema_decay", SIMPLETUNER_EMA_DECAY))}


def _needs_ema(rule: Rule) -> Rule:
    """An EMA setting: read only with use_ema on, as SimpleTuner does."""
    def wrapped(v: Any, s: Scope) -> dict[str, Any]:
        if not _bool(s.settings.get("use_ema", False)):
            raise Ignored("only read with use_ema on")
        return rule(v, s)
    return wrapped


def _ema_validation(v: Any, s: Scope) -> dict[str, Any]:
    if str(v) == "comparison":  # SimpleTuner samples both; we sample one set
        s.note("ema_validation comparison: validation images are sampled with the trained weights only here "
               "(validation.use_ema: true samples the EMA's instead); both LoRA files are saved")
        return {}
    return {"validation.use_ema": str(v) == "ema_only"}


# SimpleTuner's scheduled sampling (its documentation): off unless max_step_offset > 0; probability 0.0 by default
# (so nothing rolls until it is set); a ramp from prob_start 0.0 to prob_end 0.5 over ramp_steps; sampler unipc.
SIMPLETUNER_ROLLOUT = "scheduled_sampling_"
SIMPLETUNER_ROLLOUT_PROB_END = 0.5
SIMPLETUNER_ROLLOUT_SAMPLER = "unipc"


def _rollout_on(settings: dict[str, Any]) -> bool:
    return _int(settings.get(SIMPLETUNER_ROLLOUT + "max_step_offset") or 0) > 0


def _scheduled_sampling(v: Any, s: Scope) -> dict[str, Any]:
    """scheduled_sampling_max_step_offset with its probability or ramp -> flow.scheduled_sampling."""
    offset, st = _int(v), s.settings
    if offset <= 0:
        return {}
    ours = "flow.scheduled_sampling."
    ramp = _int(st.get(SIMPLETUNER_ROLLOUT + "ramp_steps") or 0)
    if ramp:
        out = {ours + "ramp_steps": ramp,
               ours + "prob_start": float(st.get(SIMPLETUNER_ROLLOUT + "prob_start") or 0.0),
               ours + "prob_end": float(st.get(SIMPLETUNER_ROLLOUT + "prob_end", SIMPLETUNER_ROLLOUT_PROB_END))}
        if st.get(SIMPLETUNER_ROLLOUT + "probability") is not None:
            s.note("scheduled_sampling_probability with scheduled_sampling_ramp_steps: the ramp's prob_start and "
                   "prob_end set the chance here (flow.scheduled_sampling.prob_start/prob_end)")
    else:
        chance = float(st.get(SIMPLETUNER_ROLLOUT + "probability") or 0.0)
        if chance == 0:
            s.note("scheduled_sampling_max_step_offset without scheduled_sampling_probability (SimpleTuner's "
                   "default 0.0) rolls nothing out: flow.scheduled_sampling left off")
            return {}
        out = {ours + "probability": chance}
    if st.get(SIMPLETUNER_ROLLOUT + "sampler") is None:
        s.note(f"scheduled sampling: SimpleTuner's default rollout sampler ({SIMPLETUNER_ROLLOUT_SAMPLER}) is another "
               "solver of the same ODE; the rollouts here take Euler steps (FlowMatchEulerDiscreteScheduler's)")
    return {ours + "max_step_offset": offset, **out}


def _needs_rollout(rule: Rule) -> Rule:
    """A scheduled-sampling setting: read only with scheduled_sampling_max_step_offset > 0, as SimpleTuner does."""
    def wrapped(v: Any, s: Scope) -> dict[str, Any]:
        if not _rollout_on(s.settings):
            raise Ignored("only read with scheduled_sampling_max_step_offset > 0")
        return rule(v, s)
    return wrapped


ROLLOUT_RULES: dict[str, Rule] = {
    SIMPLETUNER_ROLLOUT + "max_step_offset": _scheduled_sampling,
    **{SIMPLETUNER_ROLLOUT + k: _needs_rollout(lambda v, s: {})  # read by _scheduled_sampling
       for k in ("probability", "ramp_steps", "prob_start", "prob_end")},
    SIMPLETUNER_ROLLOUT + "start_step": _needs_rollout(refuse_unless(
        lambda v: _int(v) == 0, "the probability ramp starts at step 0 here")),
    SIMPLETUNER_ROLLOUT + "ramp_shape": _needs_rollout(refuse_unless(
        lambda v: str(v).lower() == "linear", "the probability ramps linearly here")),
    SIMPLETUNER_ROLLOUT + "strategy": _needs_rollout(refuse_unless(
        lambda v: str(v).lower() == "uniform", "the rollout length is uniform in 0..max_step_offset here")),
    SIMPLETUNER_ROLLOUT + "sampler": _needs_rollout(refuse_unless(
        lambda v: str(v).lower() == "euler", "the rollouts take Euler steps here (SimpleTuner's euler)")),
    SIMPLETUNER_ROLLOUT + "order": _needs_rollout(ignore("only SimpleTuner's higher-order samplers read it")),
    SIMPLETUNER_ROLLOUT + "reflexflow": _needs_rollout(refuse_unless(
        lambda v: not _bool(v), "ReflexFlow's extra loss terms are not built here")),
    **{SIMPLETUNER_ROLLOUT + "reflexflow_" + k: _needs_rollout(ignore("only read with scheduled_sampling_reflexflow"))
       for k in ("alpha", "beta1", "beta2")},
}


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
    base = name if name in SIMPLETUNER_OPTIMIZERS else name.removesuffix("-paged")  # paged 8-bit ones exist here too
    if base not in SIMPLETUNER_OPTIMIZERS:
        raise NotConverted(f"no equivalent; we translate {', '.join(SIMPLETUNER_OPTIMIZERS)} (and bnb -paged "
                           "variants)")
    ours, beta1, beta2, eps, decay = SIMPLETUNER_OPTIMIZERS[base]
    if base != name:
        s.note(f"optimizer {name}: same update as {base}, without paged (CPU-offloaded) states")
    out = {"train.optimizer": ours, "train.adam_beta1": beta1, "train.adam_beta2": beta2, "train.weight_decay": decay}
    if eps is not None:
        out["train.adam_epsilon"] = eps
    if ours == "adamw_bf16":
        out["lora.dtype"] = "bf16"  # SimpleTuner's adamw_bf16 trains bf16 weights: pure-bf16 LoRA
    if ours == "prodigy":
        out["train.learning_rate"] = 1.0  # SimpleTuner's prodigy settings hold lr 1.0, which wins over learning_rate
        if "learning_rate" in s.settings and "learning_rate" not in s.defaults and float(s.settings["learning_rate"]) != 1:
            s.note(f"learning_rate {s.settings['learning_rate']}: SimpleTuner runs prodigy at lr 1.0 (its default "
                   "settings override learning_rate; optimizer_config lr=... sets it), and so does this job")
        s.note("optimizer prodigy: SimpleTuner's is prodigy-plus-schedule-free (Prodigy with schedule-free averaging "
               "and a factored second moment); this job trains with the original Prodigy (prodigyopt), the same "
               "step-size estimate without those")
    if OPTIMIZERS[ours].schedule_free:
        scheduler = s.settings.get("lr_scheduler", "constant")
        if scheduler not in ("constant", "constant_with_warmup"):
            s.note(f"lr_scheduler {scheduler}: SimpleTuner replaces it with schedule-free's averaging, as this job "
                   "does (train.lr_scheduler constant; lr_warmup_steps warms the optimizer up)")
        out["train.lr_scheduler"] = "constant"
    return out


def _polynomial_only(why: str) -> Rule:
    """lr_power and lr_end: read by _lr_scheduler for the polynomial schedule; meaningless with any other."""
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        if s.settings.get("lr_scheduler") != "polynomial":
            raise Ignored(why)
        return {}
    return rule


def _lr_scheduler(v: Any, s: Scope) -> dict[str, Any]:
    name = str(v)
    if name == "cosine_with_restarts":  # SimpleTuner's own: a cosine per lr_warmup_steps steps, no warmup
        raise NotConverted("SimpleTuner restarts its cosine every lr_warmup_steps steps, without warmup; ours "
                           "(diffusers') spreads train.lr_num_cycles cosines over the run after the warmup: set them")
    if name not in SCHEDULERS:
        raise NotConverted("train.lr_scheduler is constant, cosine, linear, polynomial or cosine_with_restarts "
                           "after a linear warmup")
    out: dict[str, Any] = {"train.lr_scheduler": SCHEDULERS[name]}
    if name == "polynomial":
        out["train.lr_power"] = float(s.settings.get("lr_power", SIMPLETUNER_LR_POWER))
        lr_end = float(s.settings.get("lr_end", SIMPLETUNER_LR_END))
        if lr_end != POLYNOMIAL_LR_END:
            s.note(f"lr_end {lr_end:g}: the polynomial schedule here ends at {POLYNOMIAL_LR_END:g} (diffusers')")
    return out


def _optimizer_config(v: Any, s: Scope) -> dict[str, Any]:
    """SimpleTuner's "eps=1e-6,weight_decay=0.0" (or a JSON object) overrides the optimizer's defaults."""
    pairs = v if isinstance(v, dict) else dict(p.split("=", 1) for p in str(v).split(",") if "=" in p)
    ours = {"eps": "train.adam_epsilon", "weight_decay": "train.weight_decay"}
    prodigy = str(s.settings.get("optimizer", "")).lower() == "prodigy"
    out: dict[str, Any] = {}
    for key, value in pairs.items():
        if key in ours:
            out[ours[key]] = float(value)
        elif prodigy and key == "lr":
            out["train.learning_rate"] = float(value)
        elif prodigy and key in PRODIGY_SETTINGS:
            out[f"train.prodigy.{key}"] = PRODIGY_SETTINGS[key](value)
        elif key == "betas" and isinstance(value, list) and len(value) == 2:
            out["train.adam_beta1"], out["train.adam_beta2"] = float(value[0]), float(value[1])
        else:
            s.conv.not_converted.append(f"{s.label('optimizer_config.' + key, value)} (no such optimizer setting "
                                        "here: we set betas, eps and weight_decay)")
    return out


def _is_lycoris(s: Scope) -> bool:
    return str(s.settings.get("lora_type", "standard")).lower() == "lycoris"


def _peft_only(rule: Rule) -> Rule:
    """A setting of SimpleTuner's peft LoRA, which it does not read with lora_type lycoris."""
    def wrapped(v: Any, s: Scope) -> dict[str, Any]:
        if _is_lycoris(s):
            raise Ignored("not read with lora_type lycoris (its lycoris_config sets the adapter)")
        return rule(v, s)
    return wrapped


def _if_lycoris(rule: Rule) -> Rule:
    def wrapped(v: Any, s: Scope) -> dict[str, Any]:
        if not _is_lycoris(s):
            raise Ignored("only read with lora_type lycoris")
        return rule(v, s)
    return wrapped


# SimpleTuner's apply_preset target_module classes -> lora.targets: SD3's Attention holds to_q/k/v/out.0 and the
# text stream's add_*_proj/to_add_out (and attn2's on SD3.5), FeedForward the ff and ff_context layers
LYCORIS_TARGETS = {frozenset({"Attention"}): "attention+context", frozenset({"Attention", "FeedForward"}): "all"}
LYCORIS_READ = {"algo", "multiplier", "linear_dim", "linear_alpha", "factor", "full_matrix", "apply_preset"}


def _lora_type(v: Any, s: Scope) -> dict[str, Any]:
    if str(v).lower() not in ("standard", "lycoris"):
        raise Refused("SimpleTuner's LoRA types are standard (peft) and lycoris")
    if _is_lycoris(s) and not s.settings.get("lycoris_config"):
        raise Refused("lora_type lycoris without lycoris_config: give the LyCORIS config file (its algo, "
                      "linear_dim, factor ...), or lora_type standard")
    return {}


def _lycoris_config(v: Any, s: Scope) -> dict[str, Any]:
    """SimpleTuner's lycoris_config JSON (lora_type lycoris) -> lora.kind, rank, alpha, targets and lora.lycoris."""
    if not _is_lycoris(s):
        raise Ignored("only read with lora_type lycoris")
    given = Path(str(v)).expanduser()
    # SimpleTuner reads it from its own folder, the one above config/ in its layout
    found = [p for p in ([given] if given.is_absolute() else [s.folder / given, s.folder.parent / given])
             if p.is_file()]
    if not found:
        raise Refused(f"{given} is not a file here (nor beside {s.source.name}): give its absolute path, so its "
                      "LyCORIS settings are converted")
    try:
        lyco = json.loads(found[0].read_text())
    except (OSError, ValueError) as e:
        raise Refused(f"{found[0]} is not a JSON file ({e})") from None
    algo = str(lyco.get("algo", "lora")).lower()
    if algo not in ("lokr", "loha"):
        raise Refused(f"LyCORIS algo {algo!r} in {found[0]}: LyCORIS is trained here as lokr or loha (lora.kind); "
                      "its lora is lora.kind lora (lora_type standard)")
    if float(lyco.get("multiplier", 1.0)) != 1.0:
        raise Refused(f"multiplier {lyco['multiplier']} in {found[0]}: the adapter trains at strength 1 here")
    out: dict[str, Any] = {"lora.kind": algo}

    def lost(key: str, why: str) -> None:
        s.conv.refused.append(f"{s.refusal(s.label('lycoris_config', v))} {key} = {_fmt(lyco[key])} ({why})")

    # LoKr with whole factors (full_matrix, or a linear_dim too large to factor: LyCORIS then makes them whole
    # itself) has scale 1: its linear_dim (often 10000) and alpha mean nothing
    full = algo == "lokr" and (_bool(lyco.get("full_matrix", False))
                               or _int(lyco.get("linear_dim", 4)) > MAX_LORA_RANK)
    if not full:
        out["lora.rank"] = _int(lyco.get("linear_dim", 4))  # LyCORIS's defaults
        out["lora.alpha"] = float(lyco.get("linear_alpha", 1))
    preset = lyco.get("apply_preset") or {}
    modules = frozenset(str(m) for m in preset.get("target_module", []))
    if modules in LYCORIS_TARGETS:
        out["lora.targets"] = LYCORIS_TARGETS[modules]
    else:
        out["lora.targets"] = "all"
        lost("apply_preset", "LyCORIS here adapts the layers of lora.targets: target_module [Attention] is "
             "attention+context, [Attention, FeedForward] all (used)")
    factors = {float(c["factor"]) for c in (preset.get("module_algo_map") or {}).values()
               if isinstance(c, dict) and "factor" in c}
    if preset.get("name_algo_map") or len(factors) > 1 or any(
            set(c) - {"factor"} for c in (preset.get("module_algo_map") or {}).values() if isinstance(c, dict)):
        lost("apply_preset", "per-module LyCORIS settings: one factor for every layer here")
    if algo == "lokr":
        out["lora.lycoris.factor"] = _int(lyco.get("factor", factors.pop() if len(factors) == 1 else -1))
        out["lora.lycoris.full_matrix"] = full
    elif "factor" in lyco or "full_matrix" in lyco:
        s.conv.ignored.append(f"{s.label('lycoris_config', v)} factor / full_matrix (LoKr's; LoHa reads neither)")
    for key in sorted(set(lyco) - LYCORIS_READ):
        s.conv.not_converted.append(f"{s.label('lycoris_config', v)} {key} = {_fmt(lyco[key])} (no such LyCORIS "
                                    "setting here)")
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


def _crop_aspect(v: Any, s: Scope) -> dict[str, Any]:
    if v in ("closest", "random") and not s.settings.get("crop_aspect_buckets"):
        raise Never(f"crop_aspect {v} needs crop_aspect_buckets (SimpleTuner refuses it too): add e.g. "
                    "\"crop_aspect_buckets\": [0.75, 1.0, 1.33]")
    if v not in ("square", "preserve", "closest", "random"):
        raise NotConverted("crop_aspect is square, preserve, closest or random")
    return {"crop_aspect": v}


def _aspect_buckets(v: Any, s: Scope) -> dict[str, Any]:
    """Ratios, or SimpleTuner's weighted {"aspect_bucket": 1.0, "weight": 0.5} (weights are not used here)."""
    ratios = []
    for b in _list(v):
        if isinstance(b, dict):
            raise NotConverted("weighted aspect buckets: we pick among plain ratios, e.g. [0.75, 1.0, 1.33]")
        ratios.append(float(b))
    return {"crop_aspect_buckets": ratios}


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
    "model_type": _model_type,
    "controlnet": never_when_on("raytune_sd3 trains no ControlNet: a plain LoRA would ignore the conditioning"),
    "twinflow_enabled": never_when_on("raytune_sd3 trains no TwinFlow model"),
    "distillation_method": never_when_on("raytune_sd3 trains no distilled model"),
    "use_ema": _use_ema,
    "ema_decay": _needs_ema(lambda v, s: {"train.ema_decay": float(v)}),
    "ema_validation": _needs_ema(_ema_validation),
    "ema_update_interval": _needs_ema(only(lambda v: _is_off(v) or _int(v) == 1,
                                           "the EMA is updated after every optimizer step here")),
    **{k: _needs_ema(ignore("the EMA lives on each training worker's device (in the memory estimate)"))
       for k in ("ema_device", "ema_cpu_only", "ema_foreach_disable")},
    **ROLLOUT_RULES,
    "loss_type": refuse_unless(lambda v: str(v) == "l2", "our loss is the mean squared error (SimpleTuner's l2)"),
    "snr_gamma": refuse_unless(lambda v: float(v) == 0, "no min-SNR loss weighting here (flow.weighting none, "
                               "sigma_sqrt or cosmap)"),
    "train_text_encoder": refuse_unless(lambda v: not _bool(v), "the text encoders stay frozen here"),
    "pretrained_model_name_or_path": to("model.pretrained", str),
    "model_flavour": _flavour,
    "aspect_bucket_alignment": _alignment,
    "aspect_bucket_rounding": ignore("buckets here are exact sizes (width x height), not rounded aspect ratios"),
    "revision": to("model.revision", str),
    "mixed_precision": _mixed_precision,
    "base_model_precision": _base_precision,
    "base_model_default_dtype": _base_dtype,
    **{f"text_encoder_{i}_precision": only(lambda v: v == "no_change", NO_CHANGE) for i in (1, 2, 3)},
    "lora_type": _lora_type,
    "lycoris_config": _lycoris_config,
    "validation_lycoris_strength": _if_lycoris(only(lambda v: float(v) == 1.0, "validation images use the whole "
                                                    "adapter here (strength 1)")),
    "init_lora": path("lora.init_from"),  # its kind, rank, alpha and targets are checked against the file
    "lora_rank": _peft_only(to("lora.rank", _int)),
    "lora_alpha": _peft_only(to("lora.alpha", float)),
    "lora_dropout": _peft_only(to("lora.dropout", float)),
    "peft_lora_target_modules": _peft_only(to("lora.targets", lambda v: [
        str(x) for x in (json.loads(v) if isinstance(v, str) else v)])),  # JSON, as SimpleTuner
    "lora_init_type": _peft_only(refuse_unless(lambda v: v == "default", "LoRA starts with peft's default init here")),
    "use_dora": _peft_only(flag("lora.kind", "dora")),
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
    "flow_use_beta_schedule": refuse_unless(lambda v: not _bool(v), "flow.sigma_sampling is logit_normal, "
                                            "uniform or mode"),
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
    "lr_scheduler": _lr_scheduler,
    "lr_power": _polynomial_only("only the polynomial schedule uses it"),
    "lr_end": _polynomial_only("only SimpleTuner's polynomial and cosine schedules use it"),
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
    "num_validation_images": to("validation.num_images", _int),
    "validation_negative_prompt": lambda v, s: {"validation.negative_prompt": str(v)} if str(v) else {},
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
    "conditioning": never_when_on("conditioning data are for ControlNet and edit models, which raytune_sd3 does "
                                  "not train"),
    "dataset_type": lambda v, s: {},
    "disabled": lambda v, s: {},
    "instance_data_dir": lambda v, s: ({"instance_data_dir": str(v)} if is_uri(str(v))
                                       else path("instance_data_dir")(v, s)),
    "dataset": to("dataset", str),
    "split": to("split", str),
    "image_column": to("image_column", str),
    "caption_column": to("caption_column", str),
    "urls": to("urls", str),
    "caption_strategy": _caption_strategy,
    "instance_prompt": to("instance_prompt", str),
    "resolution": _resolution,
    "resolution_type": choice("resolution_type", {"pixel_area": "pixel_area", "pixel": "pixel", "area": "pixel_area"},
                              "resolution_type is pixel_area, pixel or area"),
    "crop": to("crop", _bool),
    "crop_style": choice("crop_style", {"center": "center", "centre": "center", "corner": "corner",
                                        "random": "random"}, "no face detection here: center, corner or random"),
    "crop_aspect": _crop_aspect,
    "crop_aspect_buckets": _aspect_buckets,
    "minimum_image_size": _size_key("minimum_image_size"),
    "maximum_image_size": _size_key("maximum_image_size"),
    "target_downsample_size": _size_key("target_downsample_size"),
    "repeats": lambda v, s: {"repeats": _int(v)} if _int(v) else {},
    "is_regularisation_data": lambda v, s: {"is_regularisation_data": True} if _bool(v) else {},
    "probability": only(lambda v: float(v) == 1, "every data set's batches are shuffled together here: weight a "
                                                 "data set by its number of images and repeats instead"),
    **{k: ignore(CACHE_WHY) for k in ("cache_dir_vae", "cache_dir", "text_embeds", "image_embeds", "hash_filenames",
                                      "preserve_data_backend_cache", "vae_cache_clear_each_epoch")},
    **{k: ignore(LOADER_WHY) for k in ("metadata_backend", "skip_file_discovery", "write_batch_size", "default",
                                       "scan_for_errors", "read_batch_size", "max_workers", "vae_cache_ondemand",
                                       "vae_cache_scan_behaviour", "image_processing_batch_size",
                                       "metadata_update_interval", "compress_cache", "disable_validation")},
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
    conv = scope.conv
    for key, value in scope.settings.items():
        if key not in rules and not _is_off(value):
            why = "no equivalent in raytune_sd3"
            # a data set's settings all change what is trained
            (conv.refused.append(f"{scope.refusal(scope.label(key, value))} ({why})") if scope.data
             else conv.not_converted.append(f"{scope.label(key, value)} ({why})"))
        elif key not in rules:
            off.append(key)
    for key, rule in rules.items():
        value = scope.settings.get(key)
        if value is None or value == "":
            continue  # SimpleTuner passes no argument for null or empty
        label = scope.label(key, value)
        try:
            out = rule(value, scope)
        except Never as e:
            conv.never.append(f"{scope.refusal(label)} ({e})")
        except NotConverted as e:
            if isinstance(e, Refused) or scope.data:
                conv.refused.append(f"{scope.refusal(label)} ({e})")
            else:
                conv.not_converted.append(f"{label} ({e})")
        except Ignored as e:
            conv.ignored.append(f"{label} ({e})")
        except (ValueError, TypeError) as e:
            (conv.refused if scope.data else conv.not_converted).append(
                f"{scope.refusal(label) if scope.data else label} (cannot use the value: {e})")
        else:
            scope.out.update(out)
            conv.converted += 1
            if key in scope.defaults and out and not scope.data:
                conv.defaults.append(f"{key} = {_fmt(value)} -> " + ", ".join(f"{k} = {_fmt(v)}" for k, v in
                                                                              out.items()))
    if off:
        scope.note(f"false or null, so nothing to convert: {', '.join(off)}")


def _aws_folder(entry: dict[str, Any], where: str, conv: Conversion) -> dict[str, Any]:
    """SimpleTuner's `type: aws` keys -> our instance_data_dir URI (s3://bucket/prefix, the endpoint and region in
    its query); its credentials were dropped with a note (the environment gives them)."""
    bucket = str(entry.pop("aws_bucket_name", "") or "")
    if not bucket:
        raise Never(f"[{entry['id']}] type aws has no aws_bucket_name: set the bucket of its images")
    prefix = str(entry.pop("aws_data_prefix", "") or "").strip("/")
    query = []
    endpoint = str(entry.pop("aws_endpoint_url", "") or "")
    if endpoint:
        parts = urlsplit(endpoint)
        query += [f"endpoint_override={parts.netloc or parts.path}", f"scheme={parts.scheme or 'https'}"]
    region = entry.pop("aws_region_name", None)
    if region:
        query.append(f"region={region}")
    conv.defaults.append(f"{where}type aws -> instance_data_dir s3://{bucket}/{prefix} (read from the bucket by the "
                         "caching tasks; credentials from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    return {**entry, "type": "local",
            "instance_data_dir": f"s3://{bucket}/{prefix}".rstrip("/") + (f"?{'&'.join(query)}" if query else "")}


HF_KEYS = ("dataset_name", "split", "image_column", "caption_column", "revision")


def _huggingface(entry: dict[str, Any], where: str, conv: Conversion) -> dict[str, Any]:
    """SimpleTuner's `type: huggingface` keys -> our type huggingface (a data set in the local HF cache: never
    downloaded at run time)."""
    name = entry.pop("dataset_name", None)
    if not name:
        raise Never(f"[{entry['id']}] type huggingface has no dataset_name: set the hub id (owner/name)")
    if entry.get("caption_strategy", "huggingface") in ("huggingface", "filename", "textfile"):
        entry["caption_strategy"] = "textfile"  # ours, for a table: caption_column
    entry.pop("metadata_backend", None)
    if entry.pop("revision", None):
        conv.not_converted.append(f"{where}revision (the data set's snapshot in the local HF cache is read: download "
                                  "the revision you want with hf download --repo-type dataset --revision)")
    conv.defaults.append(f"{where}type huggingface -> dataset {name} (read from the local HF cache, never "
                         f"downloaded at run time: hf download --repo-type dataset {name} first)")
    return {**entry, "dataset": str(name)}


WEBSHART_LOADER = ("cache_dir", "metadata_cache_dir", "shard_cache_dir", "shard_cache_gb", "parallel_downloads",
                   "buffer_size", "max_file_size", "optimize_captions", "optimise_captions")


def _webshart(entry: dict[str, Any], where: str, conv: Conversion) -> dict[str, Any]:
    """SimpleTuner's `type: webshart` (WebDataset tar shards read through the webshart package, from a folder or a
    hub data set it downloads) -> our type webdataset: the shards' folder (or URI) becomes `urls`, every .tar under
    it; captions from each sample's .txt member. A hub data set is downloaded first, never at run time."""
    block = dict(entry.pop("webshart", None) or {})
    if block.pop("hf_token", None) is not None:
        conv.secrets.append(f"{where}webshart.hf_token (a credential is never copied into a job file)")
    shards = entry.pop("source", None) or block.pop("source", None)
    subfolder = entry.pop("subfolder", None) or block.pop("subfolder", None)
    if not shards:
        raise Never(f"[{entry['id']}] type webshart has no source: set the folder of its tar shards")
    shards = str(shards)
    if not (is_uri(shards) or shards.startswith(("/", ".", "~")) or Path(shards).expanduser().exists()):
        raise Never(f"[{entry['id']}] type webshart source {shards} is a hub data set, which webshart downloads while "
                    f"training: download its shards first (hf download --repo-type dataset {shards} --local-dir "
                    "DIR) and set source to DIR (or copy them to a bucket)")
    urls = shards.rstrip("/") + (f"/{str(subfolder).strip('/')}" if subfolder else "")
    metadata = entry.pop("metadata", None) or block.pop("metadata", None)
    if metadata:
        conv.not_converted.append(f"{where}metadata = {_fmt(metadata)} (webshart's JSON index: sizes and captions "
                                  "are read from the shards here, captions from each sample's .txt member)")
    for key in WEBSHART_LOADER:
        for value, label in ((entry.pop(key, None), key), (block.pop(key, None), f"webshart.{key}")):
            if value is not None:
                conv.ignored.append(f"{where}{label} = {_fmt(value)} (webshart's download and cache settings: "
                                    "shards are read where they are, each image by one ranged read)")
    for key, value in block.items():
        conv.not_converted.append(f"{where}webshart.{key} = {_fmt(value)} (no equivalent in raytune_sd3)")
    if entry.get("caption_strategy", "webshart") == "webshart":
        entry["caption_strategy"] = "textfile"  # ours, for shards: caption_key txt
    entry.pop("metadata_backend", None)
    conv.defaults.append(f"{where}type webshart -> type webdataset, urls {redacted(urls)} (every .tar under it, read "
                         "in place; captions from each sample's .txt member: caption_key txt)")
    return {**entry, "type": "webdataset", "urls": urls}


def convert_dataset(entry: dict[str, Any], config: dict[str, Any], conv: Conversion, source: Path) -> dict | None:
    """One data-loader entry -> our data set (a dict), or None for an entry that is not an image folder."""
    where = f"{source.name}[{entry['id']}]"
    entry = _drop_secrets(entry, f"{where}.", conv)
    kind, backend = str(entry.get("dataset_type", "image")), str(entry.get("type", "local"))
    if str(entry.get("disabled", entry.get("disable", False))).lower() in ("true", "1", "yes"):
        conv.ignored.append(f"{where} (disabled: SimpleTuner skips it too)")
        return None
    if kind in ("text_embeds", "image_embeds", "conditioning_image_embeds", "eval"):
        for key, value in entry.items():
            if key not in ("id", "type", "dataset_type", "disabled"):
                conv.ignored.append(f"{where}.{key} = {_fmt(value)} (a setting of SimpleTuner's {kind} data set; "
                                    "ours: data.cache_dir (keyed by everything that changes an entry) and "
                                    "data.eval_samples)")
        return None
    if kind != "image":
        conv.never.append(f"{source}: [{entry['id']}] dataset_type {kind}: raytune_sd3 trains on images only "
                          "(dataset_type image)")
        return None
    try:
        if backend == "aws":
            entry = _aws_folder(dict(entry), f"{where}.", conv)
        elif backend == "huggingface":
            entry = _huggingface(dict(entry), f"{where}.", conv)
        elif backend == "webshart":
            entry = _webshart(dict(entry), f"{where}.", conv)
    except Never as e:
        conv.never.append(f"{source}: {e}")
        return None
    if backend not in ("local", "aws", "huggingface", "webshart"):
        conv.never.append(f"{source}: [{entry['id']}] type {backend}: raytune_sd3 reads folders (local, mounted or "
                          "in S3/GCS), Parquet files, Hugging Face data sets and WebDataset shards; copy its images "
                          "(and .txt captions) to one of those")
        return None
    if backend not in ("huggingface", "webshart") and not entry.get("instance_data_dir"):
        conv.never.append(f"{source}: [{entry['id']}] has no instance_data_dir: set the folder of its images")
        return None
    explicit = {**{k: config[k] for k in DATASET_GLOBALS if config.get(k) not in (None, "")}, **entry}
    settings = {**DATASET_DEFAULTS, **explicit}
    if settings["crop"] is False:  # SimpleTuner's crop style and aspect only matter when it crops
        settings = {k: v for k, v in settings.items() if k in explicit or k not in ("crop_style", "crop_aspect")}
    scope = Scope(settings, conv, where=f"{where}.", defaults=set(DATASET_DEFAULTS) - set(explicit), source=source,
                  data=True)
    _apply(DATASET_RULES, scope)
    return scope.out


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


def _stop_if_refused(conv: Conversion, lossy: bool) -> None:
    """Never-converted things stop the conversion; refused settings too unless --lossy (then they are lost)."""
    if conv.never or (conv.refused and not lossy):
        lines = conv.never + ([] if lossy else conv.refused)
        hint = ("\nThese change what is trained. To convert without them (listed as lost in the job), pass --lossy."
                if conv.refused and not lossy else "")
        raise ConvertError("refused, nothing written:\n" + "\n".join(f"  {x}" for x in lines) + hint)
    conv.lost = list(conv.refused)


def convert_simpletuner(config_path: str | Path, backends_path: str | Path, lossy: bool = False) -> Conversion:
    """SimpleTuner's config (JSON, TOML, env or the web UI's form) + data-loader file -> a Conversion whose `job`
    validates as a JobConfig, trained as SimpleTuner would (its defaults applied).

    Raises ConvertError (naming the file) for an unreadable input, one that is not SimpleTuner's, a refused setting
    (unless lossy, for those that only lose something), or one that does not make a valid job."""
    config_path, backends_path = Path(config_path), Path(backends_path)
    conv = Conversion()
    raw, unread = read_config(config_path)
    conv.ignored += unread
    backends = read_backends(backends_path)
    config: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(str(key).lstrip("-"), str(key).lstrip("-"))  # "--key" or "key", current or legacy name
        if name in config and not _is_secret(name, config[name]):
            conv.ignored.append(f"{name} = {_fmt(config[name])} (set again as {key}: the later value counts, as in "
                                "SimpleTuner)")
        config[name] = value
    if not config.keys() & {"model_family", "pretrained_model_name_or_path", "model_flavour"}:
        raise ConvertError(f"{config_path}: not a SimpleTuner config (it sets none of model_family, "
                           "pretrained_model_name_or_path, model_flavour)")
    if str(config.get("model_family", "sd3")).lower() != "sd3":
        raise ConvertError(f"{config_path}: model_family: {config['model_family']!r} is not trained here: "
                           "raytune_sd3 trains Stable Diffusion 3 / 3.5 only (model_family sd3)")
    if not all(isinstance(b, dict) and b.get("id") for b in backends):
        raise ConvertError(f"{backends_path}: not a SimpleTuner multidatabackend.json (every entry is an object "
                           "with an id)")

    config = _drop_secrets(config, "", conv)
    for key in [k for k, v in config.items() if isinstance(v, str) and v.strip().lower() == "false"]:
        # SimpleTuner's loaders pass no argument for the string "false" (a config.env's values are all strings), so
        # the option keeps its default: gradient_checkpointing "false" still checkpoints there
        conv.ignored.append(f"{key} = \"{config.pop(key)}\" (SimpleTuner passes nothing for the string \"false\": "
                            "its default applies; write false, unquoted, in JSON or TOML to turn it off)")
    defaults = {k: v for k, v in SIMPLETUNER_DEFAULTS.items() if k not in config}
    scope = Scope({**defaults, **config}, conv, folder=config_path.parent, defaults=set(defaults),
                  source=config_path)
    _apply(CONFIG_RULES, scope)
    if "model.pretrained" not in scope.out:
        scope.out["model.pretrained"] = FLAVOURS["medium"]
        conv.defaults.append(f"model_flavour = \"medium\" (no model named) -> model.pretrained = {FLAVOURS['medium']}")
    if "output_dir" not in scope.out:
        scope.out["output_dir"] = "simpletuner-results"
        conv.defaults.append("output_dir = \"simpletuner-results\" -> output_dir (use shared storage on a cluster)")
    if "seed" not in config:
        scope.note("seed not set: SimpleTuner runs unseeded, this job seeds with train.seed = 0 (reproducible)")
    datasets = [ds for b in backends if (ds := convert_dataset(b, config, conv, backends_path))]
    if not datasets and not conv.never:
        raise ConvertError(f"{backends_path}: no enabled image data set to convert (SimpleTuner's data sets with "
                           "dataset_type image)")
    _stop_if_refused(conv, lossy)
    job = _nest(scope.out)
    job.setdefault("data", {})["datasets"] = datasets
    try:
        cfg = load_job(raw=copy.deepcopy(job))
        if "train.max_steps" not in scope.out:
            steps = _epoch_steps(_int(config.get("num_train_epochs", 1)), datasets, cfg.train, conv)
            if steps is not None:
                job["train"]["max_steps"] = steps
                load_job(raw=copy.deepcopy(job))
    except ConfigError as e:
        raise ConvertError(f"{config_path} + {backends_path}: the converted job is not valid:\n{e}") from None
    conv.job = job
    return conv


def render(conv: Conversion, sources: list[Path]) -> str:
    """The job file: the report as YAML comments, then the validated job (every default filled in)."""
    head = [f"Converted from SimpleTuner ({' + '.join(map(str, sources))}) by python -m raytune_sd3.convert.",
            f"{conv.converted} settings converted. A setting not converted keeps raytune_sd3's default (in the job "
            "below).", "Read the lines below, then run: python -m raytune_sd3.check THIS_FILE", ""]
    comments = "".join(f"# {line}".rstrip() + "\n" for line in head + conv.report())
    return comments + "\n" + dump_job(JobConfig.model_validate(conv.job))


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m raytune_sd3.convert", __doc__)
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    st = sources.add_parser("simpletuner", help="SimpleTuner's config + multidatabackend.json")
    st.add_argument("config", type=Path, metavar="CONFIG", help="SimpleTuner's config.json (keys with or without a "
                    "leading --), config.toml, config.env, or a config saved by its web UI")
    st.add_argument("backends", type=Path, metavar="MULTIDATABACKEND", help="SimpleTuner's data sets (JSON, or its "
                    "web UI's saved form)")
    st.add_argument("--lossy", action="store_true", help="convert even when a setting that changes what is trained "
                    "has no equivalent here (listed as lost); ControlNet, TwinFlow and unreadable data still refuse")
    st.add_argument("-o", "--output", type=Path, required=True, help="the job YAML to write, e.g. jobs/mine.yaml")
    st.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    args = parser.parse_args(argv)
    try:
        conv = convert_simpletuner(args.config, args.backends, lossy=args.lossy)
        if args.output.exists() and not args.force:
            raise ConvertError(f"{args.output}: exists; pass --force to overwrite it")
        atomic.write_text(args.output, render(conv, [args.config, args.backends]))
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.output}: cannot write it ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {conv.converted} settings converted ({len(conv.defaults)} of them SimpleTuner's "
          f"defaults), {len(conv.lost)} lost, {len(conv.not_converted)} not converted, {len(conv.ignored)} ignored, "
          f"{len(conv.secrets)} secrets dropped")
    for line in conv.report():
        print(f"  {line}")
    print(f"next: python -m raytune_sd3.check {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
