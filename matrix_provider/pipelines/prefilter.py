"""CPU-only pre-filter: the admission checks of natural_reasoning (length, English prose, reasoning-cue
density, then datatrove's Gopher, C4 and FineWeb quality blocks), no LLM and no agent: every row is
decided in its partition driver as it is read. Run it
over a whole snapshot first and feed only its `ok` rows to the LLM stages; at DCLM scale most
documents stop here, as in the paper. An `ok` row carries its text (for WARC input: the text
extracted from the page) and the WARC metadata, so the output is the next stage's input.
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
    row = msg.row
    kept = {"text": row["text"]} if msg.status == OK else {}
    return {
        "url": row.get("url"),
        "chars": len(str(row["text"])),
        **kept,
        **{k: row.get(k) for k in ("warc_record_id", "date", "language")},
    }


PIPELINE = Pipeline(
    name="prefilter",
    orchestrator=PrefilterOrchestrator,
    roles={},
    columns=pa.schema(
        [
            pa.field("url", pa.string()),
            pa.field("chars", pa.int64()),
            pa.field("text", pa.string()),
            pa.field("warc_record_id", pa.string()),
            pa.field("date", pa.string()),
            pa.field("language", pa.string()),
        ]
    ),
    output=output,
    admit=cheap_checks,
    check_params=check_params,
)
