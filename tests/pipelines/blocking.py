"""One role that blocks its actor's event loop (synchronous work inside `run`) for `params.block_s`.

While it blocks, the agent answers no call at all: a loss audit that counted "no answer" as
"holds nothing" would deliver the row again and finally give up on a row that was only slow.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import Role


class BlockingRole(Role):
    async def run(self, msg: Orchestrator) -> None:
        time.sleep(float(self.params.get("block_s", 1.0)))  # deliberately blocks the event loop
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
    name="blocking",
    orchestrator=OneStep,
    roles={"work": BlockingRole},
    columns=pa.schema([pa.field("result", pa.string())]),
    output=output,
)
