"""What a pipeline module exports: its orchestrator (routing), roles and output columns."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from matrix_provider.runtime.orchestrator import ERROR, FILTERED, Orchestrator
from matrix_provider.runtime.roles import Role
from matrix_provider.runtime.summary import Summary

# Columns every output row has, whatever the pipeline.
BASE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("deliveries", pa.int32()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("latency_s", pa.float64()),  # first admission to result, over all deliveries
    ]
)


@dataclass(frozen=True)
class Pipeline:
    name: str
    orchestrator: type[Orchestrator]
    roles: dict[str, type[Role]]
    columns: pa.Schema
    output: Callable[[Orchestrator], dict[str, Any]]
    """The pipeline's own columns of a finished row (missing ones are null)."""
    admit: Callable[[dict[str, Any], dict[str, Any]], str | None] | None = None
    """Cheap CPU checks of a row (and the spec's `params`), run by its partition driver as the row is
    read: a reason filters the row there, so a dropped document never crosses a process; None lets
    it in."""
    check_params: Callable[[dict[str, Any]], None] | None = None
    """Checks the spec's `params` before the run takes its output: raise ValueError naming the key,
    so bad params fail the run at once with that message instead of making every row an error."""
    uses_sandbox: bool = False
    """Its roles run tools through `Role.sandbox`: the run starts sandbox pools (spec `sandbox`)."""
    summary: Summary | None = None
    """The pipeline's own manifest figures (`summary`), as sums of what each output row contributes."""

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(list(BASE_SCHEMA) + list(self.columns))


def load_pipeline(name: str) -> Pipeline:
    """`natural_reasoning` -> matrix_provider.pipelines.natural_reasoning; dotted names import as is."""
    module_name = name if "." in name else f"matrix_provider.pipelines.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"pipeline module {module_name!r} not found ({exc})") from None
    pipeline = getattr(module, "PIPELINE", None)
    if not isinstance(pipeline, Pipeline):
        raise ValueError(f"pipeline module {module_name!r} has no PIPELINE = Pipeline(...)")
    return pipeline


def output_row(pipeline: Pipeline, msg: Orchestrator) -> dict[str, Any]:
    """The output row of a finished message: base columns, then the pipeline's."""
    row: dict[str, Any] = {name: None for name in pipeline.columns.names}
    if msg.status != "error":
        row.update({k: v for k, v in pipeline.output(msg).items() if k in row})
    row.update(
        id=msg.id,
        status=msg.status,
        error=msg.error,
        deliveries=msg.delivery,
        prompt_tokens=msg.usage["prompt_tokens"],
        completion_tokens=msg.usage["completion_tokens"],
    )
    return row


def admission(pipeline: Pipeline, row: dict[str, Any], params: dict[str, Any]) -> tuple[str, str] | None:
    """(status, reason) of a row the pipeline's `admit` check stops, None for a row that goes on.

    A check that raises on odd content makes that row an error row, never the unit fail.
    """
    if pipeline.admit is None:
        return None
    try:
        reason = pipeline.admit(row, params)
    except Exception as exc:
        return ERROR, f"admission check failed: {type(exc).__name__}: {exc}"
    return None if reason is None else (FILTERED, reason)


def admitted_row(pipeline: Pipeline, row_id: str, row: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    """The output row of a row its admission check stopped: the pipeline's columns filled as usual."""
    msg = pipeline.orchestrator(id=row_id, partition=0, delivery=1, deadline=0.0, row=row)
    msg.finish(status, reason)
    return {**output_row(pipeline, msg), "latency_s": 0.0}


def error_row(pipeline: Pipeline, row_id: str, status: str, reason: str, deliveries: int = 0) -> dict[str, Any]:
    """An output row for input that never reached an agent (bad line, duplicate id, deadline)."""
    row: dict[str, Any] = {name: None for name in pipeline.schema.names}
    row.update(id=row_id, status=status, error=reason, deliveries=deliveries, prompt_tokens=0, completion_tokens=0)
    return row
