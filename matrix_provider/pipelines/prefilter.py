"""CPU-only pre-filter: the admission checks of natural_reasoning (length, English prose, reasoning-cue
density, then datatrove's Gopher, C4 and FineWeb quality blocks), no LLM and no agent: every row is
decided in its partition driver as it is read. Run it
over a whole snapshot first and feed only its `ok` rows to the LLM stages; at DCLM scale most
documents stop here, as in the paper.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from matrix_provider.pipelines.doc_filters import check_params
from matrix_provider.pipelines.natural_reasoning import cheap_checks
from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline


class PrefilterOrchestrator(Orchestrator):
    """A row the cheap checks let in is done: it never leaves its partition driver."""

    def route(self, done: str | None) -> str | None:
        self.finish(OK)
        return None


def output(msg: Orchestrator) -> dict[str, Any]:
    return {"url": msg.row.get("url"), "chars": len(str(msg.row["text"]))}


PIPELINE = Pipeline(
    name="prefilter",
    orchestrator=PrefilterOrchestrator,
    roles={},
    columns=pa.schema([pa.field("url", pa.string()), pa.field("chars", pa.int64())]),
    output=output,
    admit=cheap_checks,
    check_params=check_params,
)
