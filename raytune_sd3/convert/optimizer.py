"""SimpleTuner's optimizers and learning-rate schedules -> train.optimizer, its betas, eps, weight decay and
train.lr_scheduler, with the defaults SimpleTuner builds each optimizer with (prodigy's lr 1.0, schedule-free's
constant schedule)."""

from __future__ import annotations

from typing import Any

from raytune_sd3.config import OPTIMIZERS, POLYNOMIAL_LR_END
from raytune_sd3.convert.report import Ignored, NotConverted
from raytune_sd3.convert.rules import Rule, Scope, as_bool, as_int, choice, ignore, to

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
PRODIGY_SETTINGS = {"d_coef": float, "d0": float, "growth_rate": float, "safeguard_warmup": as_bool,
                    "use_bias_correction": as_bool}


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


def _beta(n: int) -> Rule:
    def rule(v: Any, s: Scope) -> dict[str, Any]:
        if "optimizer_config" in s.settings:
            raise Ignored("SimpleTuner ignores it when optimizer_config is set")
        return {f"train.adam_beta{n}": float(v)}
    return rule


def _max_grad_norm(v: Any, s: Scope) -> dict[str, Any]:
    return {"train.max_grad_norm": float(v) if float(v) > 0 else None}  # SimpleTuner's 0 disables clipping


# config.json's optimizer and schedule keys, in the order they are applied (a slice of CONFIG_RULES)
OPTIMIZER_RULES: dict[str, Rule] = {
    "learning_rate": to("train.learning_rate", float),
    "lr_scheduler": _lr_scheduler,
    "lr_power": _polynomial_only("only the polynomial schedule uses it"),
    "lr_end": _polynomial_only("only SimpleTuner's polynomial and cosine schedules use it"),
    "lr_warmup_steps": to("train.lr_warmup_steps", as_int),
    "optimizer": _optimizer,
    "optimizer_config": _optimizer_config,
    "optimizer_beta1": _beta(1),
    "optimizer_beta2": _beta(2),
    **{k: ignore("SimpleTuner passes it to DeepSpeed's optimizer only")
       for k in ("adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay")},
    "max_grad_norm": _max_grad_norm,
    "grad_clip_method": choice("train.grad_clip", {"norm": "norm", "value": "value"}, "we clip by norm or value"),
}
