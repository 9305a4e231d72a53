"""CPU-only pre-filter: the cheap checks of natural_reasoning (length, English prose, reasoning-cue
density), no LLM. Run it over a whole snapshot first and feed only its `ok` rows to the LLM stages;
at DCLM scale most documents stop here, as in the paper.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from matrix_provider.pipelines.natural_reasoning import heuristic_verdict
from matrix_provider.runtime.orchestrator import FILTERED, OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import Role


class CheapFilterRole(Role):
    async def run(self, msg: Orchestrator) -> None:
        text = str(msg.row["text"])
        msg.set_result("filter", {"reason": heuristic_verdict(text, self.params), "chars": len(text)})


class PrefilterOrchestrator(Orchestrator):
    def route(self, done: str | None) -> str | None:
        if done is None:
            return "filter"
        reason = self.results["filter"]["reason"]
        if reason is None:
            self.finish(OK)
        else:
            self.finish(FILTERED, reason)
        return None


def output(msg: Orchestrator) -> dict[str, Any]:
    return {"url": msg.row.get("url"), "chars": msg.results.get("filter", {}).get("chars")}


PIPELINE = Pipeline(
    name="prefilter",
    orchestrator=PrefilterOrchestrator,
    roles={"filter": CheapFilterRole},
    columns=pa.schema([pa.field("url", pa.string()), pa.field("chars", pa.int64())]),
    output=output,
)
