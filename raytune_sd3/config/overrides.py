"""Dotted job keys: read and set them in a raw job (`--set a.b=c`, a Tune trial's parameters), and suggest the
closest name for a typo."""

from __future__ import annotations

import difflib
import re
from typing import Any

from raytune_sd3.config.errors import ConfigError
from raytune_sd3.config.job_file import JobFileError, parse_yaml
from raytune_sd3.config.secrets import shorten


def did_you_mean(word: str, known: list[str]) -> str:
    """" (did you mean 'x'?)" for the closest known name, else " (known: ...)"."""
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known) or 'none, it is a value'})"


def get_key(raw: Any, key: str) -> Any:
    """raw[a][b] for the dotted key "a.b" (a number indexes a list); None where a section or key is missing."""
    node = raw
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            node = node.get(part) if isinstance(node, dict) else None
    return node


def set_key(raw: dict, key: str, value: Any) -> None:
    """raw[a][b] = value for the dotted key "a.b": sections are created as needed, a number indexes an existing
    list; ConfigError naming the key when the path runs into a value or past a list's end."""
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{key}: {part!r} is not an index of the {len(node)}-item list")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[:i])} is not a section")
        if i == len(parts) - 1:
            node[part] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` strings (values parsed as YAML; `data.datasets.0.x` indexes a list) to a nested dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.\w+)*", key.strip()):
            raise ConfigError(f"--set {shorten(item, 80)}: expected KEY=VALUE with a dotted job key, e.g. "
                              "--set train.learning_rate=1e-5")
        try:
            set_key(raw, key.strip(), parse_yaml(value))
        except JobFileError as e:
            raise ConfigError(f"--set {key.strip()}: the value is {e} (quote a string: --set 'KEY=\"...\"')") from None
        except ConfigError as e:
            raise ConfigError(f"--set {e}") from None
    return raw
