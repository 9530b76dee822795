"""Reading YAML that a person wrote (a job file, a `--set` value) so that no input can crash, hang or flood us.

PyYAML's SafeLoader is the parser; its own hooks add the limits a job needs: a size cap on the file, a nesting
depth cap (the composer recurses once per level: 5,000 levels were a RecursionError), a cap on the nodes that
aliases expand to (a "billion laughs" file loads as shared objects, then hangs whatever walks it: pydantic, an
error message), and duplicate keys refused (PyYAML keeps the last silently: a second `train:` replaced the first).
Errors are `JobFileError` with a line number and no snippet of the text (a snippet can show most of a secret).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a job is a few KB; a bigger file is a mistake, not a job
MAX_DEPTH = 64  # nesting levels; a job has about 6
MAX_NODES = 100_000  # scalars, lists and mappings after aliases expand; a job has a few hundred


class JobFileError(ValueError):
    """A job file or --set value that is not YAML we accept; the message says where and why, never the text."""


def _where(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def _at(mark: yaml.Mark | None) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class _JobLoader(yaml.SafeLoader):
    """SafeLoader with the limits above."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise JobFileError(f"{_where(self.peek_event().start_mark)}nested more than {MAX_DEPTH} levels "
                                   "deep; a job is a few levels of sections")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and _expanded_nodes(node, {}) > MAX_NODES:
            raise JobFileError(f"its aliases (*name) expand to more than {MAX_NODES:,} values; a job is a few "
                               "hundred: write the values out, or reuse fewer anchors")
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may override on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if first is not key_node.start_mark:
                raise JobFileError(f"{_where(key_node.start_mark)}key {_short_key(key)} appears twice in one "
                                   f"mapping (first on line {first.line + 1}); YAML would keep only the second: "
                                   "merge the two")
        return super().construct_mapping(node, deep)


def _short_key(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes the tree has once every alias is written out (shared subtrees counted once per use)."""
    if id(node) not in memo:
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        memo[id(node)] = min(1 + sum(_expanded_nodes(c, memo) for c in children), MAX_NODES + 1)
    return memo[id(node)]


def parse_yaml(text: str) -> Any:
    """One YAML document, within the limits above; JobFileError on anything else."""
    try:
        return yaml.load(text, Loader=_JobLoader)  # noqa: S506 - _JobLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        # problem and position only: `context` and the snippet would quote the text, which may hold a secret
        raise JobFileError(f"not valid YAML{_at(e.problem_mark)}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise JobFileError(f"not valid YAML: {type(e).__name__}") from None
    except RecursionError:  # a backstop: MAX_DEPTH should have stopped it first
        raise JobFileError(f"nested too deep (more than {MAX_DEPTH} levels)") from None


def read_yaml_file(path: Path) -> Any:
    """The YAML document in the file at `path` (UTF-8, at most MAX_FILE_BYTES); JobFileError on anything else."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise JobFileError(f"{size:,} bytes, more than the {MAX_FILE_BYTES:,} a job file may have; a job "
                               "is a few KB of YAML: is this the right file?")
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise JobFileError(f"byte {e.start} is not UTF-8 ({e.reason}); save the file as UTF-8") from None
    except OSError as e:
        raise JobFileError(f"cannot be read: {e.strerror or type(e).__name__}") from None
    if "\x00" in text:
        raise JobFileError("contains a NUL byte: a job is a text file; is this the right file?")
    return parse_yaml(text)
