"""A controller-bound workload: every step does `cpu_ms` of real CPU work before a short LLM call.

Two roles take turns for `steps` steps over a history of 2-40 KB (the row's text plus the turns so
far), so each step costs what an agent step costs in real pipelines: prompt building, parsing,
bookkeeping over a long history. The work is the same code in every runner (it is the role's), so
the runners differ only in where the steps run: one process, processes split by row, or agents.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pyarrow as pa

from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import LLMRole


def cpu_work(text: str, ms: float) -> None:
    """Hash the history until this thread has spent `ms` of CPU time (not wall time, so a busy
    machine makes the step slower, as it would a real one)."""
    blob = text.encode()
    until = time.thread_time() + ms / 1000
    while time.thread_time() < until:
        hashlib.sha256(blob[:4096]).digest()


class StepRole(LLMRole):
    async def run(self, msg: Orchestrator) -> None:
        history = "\n".join([str(msg.row["text"]), *(turn["content"] for turn in msg.history)])
        cpu_work(history, float(self.params.get("cpu_ms", 0.0)))
        completion = await self.chat(msg, [{"role": "user", "content": history}])
        msg.add_turn(self.name, completion.text)


class TurnsOrchestrator(Orchestrator):
    """a -> b -> a -> ... for `steps` steps, then done."""

    steps = 4

    def route(self, done: str | None) -> str | None:
        if len(self.history) >= self.steps:
            self.finish(OK)
            return None
        return "b" if done == "a" else "a"


def output(msg: Orchestrator) -> dict[str, Any]:
    return {"steps": len(msg.history)}


PIPELINE = Pipeline(
    name="controller_bound",
    orchestrator=TurnsOrchestrator,
    roles={"a": StepRole, "b": StepRole},
    columns=pa.schema([pa.field("steps", pa.int32())]),
    output=output,
)
