"""Rows to an Arrow table without ever dropping one.

Pipelines fill their columns from input fields, which hostile input makes any JSON value. The
whole batch is converted at once; only when that fails is each row checked, and a row that does
not fit is repaired rather than lost:

- a string column given a number, list or object stores its JSON text (`"url": [1, 2]` -> `"[1, 2]"`);
- a lone UTF-16 surrogate in a string becomes U+FFFD;
- any other value a column cannot hold makes the row an `error` row naming the column, with the
  pipeline's columns left empty.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_ARROW_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeError)
BASE_COLUMNS = ("id", "status", "error", "deliveries", "prompt_tokens", "completion_tokens", "latency_s")


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except _ARROW_ERRORS:
        return pa.Table.from_pylist([fit_row(row, schema) for row in rows], schema=schema)


def _fits(value: Any, type_: pa.DataType) -> bool:
    try:
        pa.array([value], type=type_)
        return True
    except _ARROW_ERRORS:
        return False


def _as_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return _LONE_SURROGATE.sub("\ufffd", text)


def fit_row(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """The row, repaired so that `schema` can hold it (see the module docstring)."""
    fixed = dict(row)
    problems = []
    for field in schema:
        value = fixed.get(field.name)
        if _fits(value, field.type):
            continue
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            fixed[field.name] = _as_text(value)
        else:
            problems.append(f"output column {field.name!r} cannot hold {type(value).__name__} {value!r:.60}")
            fixed[field.name] = None
    if problems:
        fixed = {name: (fixed.get(name) if name in BASE_COLUMNS else None) for name in schema.names}
        previous = f"; {fixed['error']}" if fixed.get("error") else ""
        fixed.update(status="error", error="; ".join(problems) + previous)
    return fixed
