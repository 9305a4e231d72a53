"""A test pipeline whose partition driver cannot be restarted: once the flag file exists, importing
this module in a partition driver's process raises, as a driver whose node lost its copy of the
pipeline's code would. A run whose only driver dies then must fail with that cause, not spin."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import Role

FLAG = Path(tempfile.gettempdir()) / "matrix-test-fragile-driver"

if FLAG.exists() and ray.is_initialized() and "-driver-" in (ray.get_runtime_context().get_actor_name() or ""):
    raise RuntimeError(f"this driver cannot start again ({FLAG} exists)")


class SlowRole(Role):
    async def run(self, msg: Orchestrator) -> None:
        await asyncio.sleep(float(self.params.get("sleep_s", 0.2)))
        msg.set_result("work", "done")


class OneStep(Orchestrator):
    def route(self, done: str | None) -> str | None:
        if done is None:
            return "work"
        self.finish(OK)
        return None


def output(msg: Orchestrator) -> dict[str, Any]:
    return {"result": msg.results.get("work")}


PIPELINE = Pipeline(
    name="fragile_driver",
    orchestrator=OneStep,
    roles={"work": SlowRole},
    columns=pa.schema([pa.field("result", pa.string())]),
    output=output,
)
