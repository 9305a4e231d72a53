"""A test pipeline whose second role cannot start (its constructor raises), as a role with a missing
model file or a bad setting would: the run must fail with that cause, not wait for it."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import Role


class FirstRole(Role):
    async def run(self, msg: Orchestrator) -> None:
        msg.set_result("first", len(str(msg.row.get("text", ""))))


class BrokenRole(Role):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("model file /models/missing.gguf does not exist")


class TwoStepOrchestrator(Orchestrator):
    def route(self, done: str | None) -> str | None:
        if done is None:
            return "first"
        if done == "first":
            return "broken"
        self.finish(OK)
        return None


PIPELINE = Pipeline(
    name="broken_role",
    orchestrator=TwoStepOrchestrator,
    roles={"first": FirstRole, "broken": BrokenRole},
    columns=pa.schema([pa.field("chars", pa.int64())]),
    output=lambda msg: {"chars": msg.results.get("first")},
)
