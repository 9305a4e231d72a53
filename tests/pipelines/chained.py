"""Two roles, `first` then `second`, that record where and on what object each step ran.

`first` notes its process id and the id of the message object; `second` compares them with its
own. Chained (the default for two roles of equal resources) both are equal: the message object
itself moved, unpickled, within one process. With `roles.second.chain=false` neither is.
`params.hold_s` makes `second` wait, so a test can look at rows while they sit in the chained role.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pyarrow as pa

from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import Role


class First(Role):
    async def run(self, msg: Orchestrator) -> None:
        msg.set_result("first", {"pid": os.getpid(), "object": id(msg)})


class Second(Role):
    async def run(self, msg: Orchestrator) -> None:
        await asyncio.sleep(float(self.params.get("hold_s", 0.0)))
        first = msg.results["first"]
        same = {"same_process": first["pid"] == os.getpid(), "same_object": first["object"] == id(msg)}
        msg.set_result("second", same)


class FirstThenSecond(Orchestrator):
    def route(self, done: str | None) -> str | None:
        if done is None:
            return "first"
        if done == "first":
            return "second"
        self.finish(OK)
        return None


def output(msg: Orchestrator) -> dict[str, Any]:
    return msg.results["second"]


PIPELINE = Pipeline(
    name="chained",
    orchestrator=FirstThenSecond,
    roles={"first": First, "second": Second},
    columns=pa.schema([pa.field("same_process", pa.bool_()), pa.field("same_object", pa.bool_())]),
    output=output,
)
