"""The job file's key-by-key reference, generated from the schema (JobConfig and its sections), so it cannot drift:

    python docs/reference.py        # rewrites docs/config.md; tests/test_docs.py fails while it is out of date
"""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from raytune_sd3.config import JobConfig  # noqa: E402

OUT = Path(__file__).with_name("config.md")


def _type(annotation) -> str:
    """A reader's name for a field's type: `auto | int`, `list of str`, one of the literal values."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # validators (path checks) are not part of the type a user writes
        return _type(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        return {"str": "text", "int": "integer", "float": "number", "bool": "true/false",
                "PosixPath": "path", "Path": "path"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if not isinstance(value, BaseModel) else "(its section)"


def _section(annotation) -> type[BaseModel] | None:
    """The section a field holds, directly, as an optional, or as a list of them (data.datasets)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((s for a in typing.get_args(annotation) if (s := _section(a)) is not None), None)


def render() -> str:
    lines = ["# Job file reference", "",
             "Every key of a job file (`jobs/*.yaml`), generated from the schema in `raytune_sd3/config/` by",
             "`python docs/reference.py`. Any key can be overridden on the command line: `--set section.key=value`",
             "(a list item by its index: `--set data.datasets.0.resolution=512`).", ""]
    queue: list[tuple[str, type[BaseModel]]] = [("", JobConfig)]
    while queue:
        prefix, model = queue.pop(0)
        rows, sections = [], []
        for name, field in model.model_fields.items():
            section = _section(field.annotation)
            key = f"{prefix}{name}"
            if section is not None:
                many = typing.get_origin(field.annotation) is list or any(
                    typing.get_origin(a) is list for a in typing.get_args(field.annotation))
                mapping = typing.get_origin(field.annotation) is dict or any(
                    typing.get_origin(a) is dict for a in typing.get_args(field.annotation))
                sections.append((f"{key}[]." if many else f"{key}.<job key>." if mapping else f"{key}.", section))
                if many:  # a list of sections is also a key of this one
                    rows.append((key, f"list of `{key}[]` entries", _default(field), field.description or ""))
                continue
            doc = re.sub(r"\s+", " ", field.description or "").replace("|", "\\|")
            rows.append((key, _type(field.annotation), _default(field), doc))
        if rows:
            title = prefix.rstrip(".") or "top level"
            lines += [f"## {title}", "", "| key | type | default | what it does |", "|---|---|---|---|"]
            lines += [f"| `{k}` | {t} | {d} | {doc} |" for k, t, d, doc in rows]
            lines.append("")
        queue = sections + queue
    return "\n".join(lines)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
