"""A test pipeline for state-scale runs: the driver's admission check lets one row in ten through
to a plain (no-LLM) agent, so drivers, agents and the job all see many rows, cheaply."""

from __future__ import annotations

import zlib
from typing import Any

import pyarrow as pa

from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import Role


def one_in_ten(row: dict[str, Any], params: dict[str, Any]) -> str | None:
    return None if zlib.crc32(str(row["text"]).encode()) % 10 == 0 else "sampled out"


class MeasureRole(Role):
    async def run(self, msg: Orchestrator) -> None:
        msg.set_result("measure", len(str(msg.row["text"])))


class SampledOrchestrator(Orchestrator):
    def route(self, done: str | None) -> str | None:
        if done is None:
            return "measure"
        self.finish(OK)
        return None


PIPELINE = Pipeline(
    name="sampled",
    orchestrator=SampledOrchestrator,
    roles={"measure": MeasureRole},
    columns=pa.schema([pa.field("chars", pa.int64())]),
    output=lambda msg: {"chars": msg.results.get("measure")},
    admit=one_in_ten,
)
