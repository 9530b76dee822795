"""A data set's `filter`: a comparison of columns and values in Python's syntax (`width >= 512 and source ==
"web"`, `label in [1, 2]`, `not nsfw`), turned into a pyarrow compute expression. Only names, constants, lists,
comparisons and and / or / not are accepted: the text is parsed, never run."""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_COMPARE = {ast.Eq: "equal", ast.NotEq: "not_equal", ast.Lt: "less", ast.LtE: "less_equal", ast.Gt: "greater",
            ast.GtE: "greater_equal"}


@dataclass(frozen=True)
class RowFilter:
    expression: pc.Expression
    columns: list[str]

    def mask(self, table: pa.Table) -> np.ndarray:
        """Which rows of `table` the filter keeps (a null comparison drops the row)."""
        values = pa.compute.fill_null(_evaluate(self.expression, table), False)
        return values.to_numpy(zero_copy_only=False).astype(bool)


def _evaluate(expression: pc.Expression, table: pa.Table) -> pa.ChunkedArray:
    import pyarrow.dataset as pads

    return pads.dataset(table).to_table(columns={"keep": expression})["keep"]


def parse_filter(text: str) -> RowFilter:
    """The filter `text` as an expression; ValueError saying what is not allowed."""
    columns: list[str] = []

    def value(node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, str | int | float | bool):
            return node.value
        if isinstance(node, ast.List | ast.Tuple):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"filter: {ast.unparse(node)!r} is not a value (a number, a quoted text, a list)")

    def term(node: ast.AST) -> pc.Expression:
        if isinstance(node, ast.Name):
            columns.append(node.id)
            return pc.field(node.id)
        return pc.scalar(value(node))

    def walk(node: ast.AST) -> pc.Expression:
        if isinstance(node, ast.BoolOp):
            parts = [walk(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~walk(node.operand)
        if isinstance(node, ast.Name):
            columns.append(node.id)
            return pc.field(node.id)
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            left, op, right = node.left, node.ops[0], node.comparators[0]
            if isinstance(op, ast.In | ast.NotIn):
                found = term(left).isin(value(right))
                return ~found if isinstance(op, ast.NotIn) else found
            if type(op) in _COMPARE:
                return getattr(pc, _COMPARE[type(op)])(term(left), term(right))
        raise ValueError(f"filter: {ast.unparse(node)!r} is not a comparison; use ==, !=, <, <=, >, >=, in, not in, "
                         "joined by and / or / not")

    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"filter {text!r} is not an expression ({e.msg})") from None
    expression = walk(tree.body)
    return RowFilter(expression, sorted(set(columns)))
