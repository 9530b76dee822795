"""SimpleTuner's adapter: peft's LoRA / DoRA (lora_rank, lora_alpha, target modules ...) or lora_type lycoris
with its lycoris_config file -> lora.kind, rank, alpha, targets and lora.lycoris."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raytune_sd3.config import MAX_LORA_RANK
from raytune_sd3.convert.report import Ignored, Refused
from raytune_sd3.convert.rules import Rule, Scope, as_bool, as_int, flag, fmt, only, path, refuse_unless, to


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
        s.conv.refused.append(f"{s.refusal(s.label('lycoris_config', v))} {key} = {fmt(lyco[key])} ({why})")

    # LoKr with whole factors (full_matrix, or a linear_dim too large to factor: LyCORIS then makes them whole
    # itself) has scale 1: its linear_dim (often 10000) and alpha mean nothing
    full = algo == "lokr" and (as_bool(lyco.get("full_matrix", False))
                               or as_int(lyco.get("linear_dim", 4)) > MAX_LORA_RANK)
    if not full:
        out["lora.rank"] = as_int(lyco.get("linear_dim", 4))  # LyCORIS's defaults
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
        out["lora.lycoris.factor"] = as_int(lyco.get("factor", factors.pop() if len(factors) == 1 else -1))
        out["lora.lycoris.full_matrix"] = full
    elif "factor" in lyco or "full_matrix" in lyco:
        s.conv.ignored.append(f"{s.label('lycoris_config', v)} factor / full_matrix (LoKr's; LoHa reads neither)")
    for key in sorted(set(lyco) - LYCORIS_READ):
        s.conv.not_converted.append(f"{s.label('lycoris_config', v)} {key} = {fmt(lyco[key])} (no such LyCORIS "
                                    "setting here)")
    return out


# config.json's adapter keys, in the order they are applied (a slice of CONFIG_RULES)
ADAPTER_RULES: dict[str, Rule] = {
    "lora_type": _lora_type,
    "lycoris_config": _lycoris_config,
    "validation_lycoris_strength": _if_lycoris(only(lambda v: float(v) == 1.0, "validation images use the whole "
                                                    "adapter here (strength 1)")),
    "init_lora": path("lora.init_from"),  # its kind, rank, alpha and targets are checked against the file
    "lora_rank": _peft_only(to("lora.rank", as_int)),
    "lora_alpha": _peft_only(to("lora.alpha", float)),
    "lora_dropout": _peft_only(to("lora.dropout", float)),
    "peft_lora_target_modules": _peft_only(to("lora.targets", lambda v: [
        str(x) for x in (json.loads(v) if isinstance(v, str) else v)])),  # JSON, as SimpleTuner
    "lora_init_type": _peft_only(refuse_unless(lambda v: v == "default", "LoRA starts with peft's default init here")),
    "use_dora": _peft_only(flag("lora.kind", "dora")),
}
