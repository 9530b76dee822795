"""The rule machinery: a table maps each SimpleTuner key to a Rule (its value -> our dotted keys, or an outcome
raised: NotConverted, Refused, Never, Ignored); apply_rules runs a table over a Scope. Also the value parsers the
rules share (SimpleTuner writes flags, numbers and lists as JSON or as strings) and the secret filter."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_sd3.config import SECRET_KEY, SECRET_VALUE
from raytune_sd3.convert.report import Conversion, Ignored, Never, NotConverted, Refused


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
        return f"{self.where}{key} = {fmt(value)}{by_default}"

    def note(self, text: str) -> None:
        self.conv.notes.append(f"{self.where}{text}")

    def refusal(self, label: str) -> str:
        """FILE: KEY = value (a data set's label starts with the file's name already)."""
        return f"{self.source.parent / label}" if self.data else f"{self.source}: {label}"


Rule = Callable[[Any, Scope], dict[str, Any]]  # SimpleTuner value -> our keys; raises NotConverted / Ignored


# --- values --------------------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)  # one line: newlines stay escaped in YAML comments
    return text if len(text) <= 80 else text[:77] + "..."


def as_bool(v: Any) -> bool:
    """SimpleTuner's JSON holds flags as booleans or as strings ("true")."""
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def as_int(v: Any) -> int:
    f = float(v)
    if not f.is_integer():
        raise ValueError(f"expected a whole number, got {v!r}")
    return int(f)


def as_list(v: Any) -> list:
    """A JSON list, or a string holding one ("[7, 8, 9]") or comma-separated items ("7,8,9")."""
    if isinstance(v, str):
        v = json.loads(v) if v.strip().startswith("[") else [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, list):
        raise ValueError(f"expected a list, got {v!r}")
    return v


def is_off(v: Any) -> bool:
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
    return lambda v, s: {key: value} if as_bool(v) else {}


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
            on = as_bool(v)
        except ValueError:
            on = not is_off(v)  # a method name, a conditioning block
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


def is_secret(key: str, value: Any) -> bool:
    return bool(SECRET_KEY.search(key) or SECRET_VALUE.search(json.dumps(value, default=str)))


def drop_secrets(settings: dict[str, Any], where: str, conv: Conversion) -> dict[str, Any]:
    """The settings without credentials; each dropped key is reported by name, never with its value."""
    kept = {}
    for key, value in settings.items():
        if is_secret(key, value):
            conv.secrets.append(f"{where}{key} (a credential is never copied into a job file: give it to the "
                                "cluster as an environment variable, e.g. HF_TOKEN or WANDB_API_KEY)")
        else:
            kept[key] = value
    return kept


def apply_rules(rules: dict[str, Rule], scope: Scope) -> None:
    """List each key no rule knows, then run every rule whose key is set, in table order."""
    off = []
    conv = scope.conv
    for key, value in scope.settings.items():
        if key not in rules and not is_off(value):
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
                conv.defaults.append(f"{key} = {fmt(value)} -> " + ", ".join(f"{k} = {fmt(v)}" for k, v in
                                                                              out.items()))
    if off:
        scope.note(f"false or null, so nothing to convert: {', '.join(off)}")
