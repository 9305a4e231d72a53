"""NaturalReasoning-style web curation: filter -> score -> question.

- admission (in the partition driver, before any hop): cheap checks (length, English, density of
  reasoning cues), then datatrove's Gopher, C4 and FineWeb quality blocks (doc_filters.py); most
  documents stop here, as in the paper (~5 % survive at DCLM scale).
- filter: a small LLM classification of the documents that passed.
- score: the LLM grades the document's educational reasoning quality 0-5; below
  `min_score` the row is filtered.
- question: the LLM extracts a question, its answer and the reasoning chain.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from matrix_provider.pipelines.doc_filters import check_params, document_verdict
from matrix_provider.runtime.orchestrator import FILTERED, OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import LLMRole, RowError, json_schema


def excerpt(msg: Orchestrator, params: dict[str, Any]) -> str:
    return str(msg.row["text"])[: params.get("max_chars", 1000)]


def cheap_checks(row: dict[str, Any], params: dict[str, Any]) -> str | None:
    """The admission check: runs in the partition driver, so a dropped document costs no hop.
    Our reasoning heuristics, then datatrove's quality blocks (see doc_filters)."""
    return document_verdict(row.get("text"), params)


class FilterRole(LLMRole):
    """The LLM's reasoning classification of a document that passed the cheap checks."""

    async def run(self, msg: Orchestrator) -> None:
        schema = json_schema({"reasoning": {"type": "boolean", "x-sim-true-rate": 0.5}})
        answer = await self.chat_json(
            msg,
            [
                {"role": "system", "content": "You classify web documents. Answer in JSON."},
                {
                    "role": "user",
                    "content": "Does this document explain or argue something step by step "
                    f"(reasoning a student could learn from)?\n\n{excerpt(msg, self.params)}",
                },
            ],
            schema,
            "reasoning_check",
        )
        verdict = None if answer.get("reasoning", False) else "classifier: no reasoning content"
        msg.set_result("filter", {"keep": verdict is None, "reason": verdict})


class ScoreRole(LLMRole):
    async def run(self, msg: Orchestrator) -> None:
        schema = json_schema({"score": {"type": "integer", "minimum": 0, "maximum": 5}})
        answer = await self.chat_json(
            msg,
            [
                {"role": "system", "content": "You grade documents for teaching reasoning. Answer in JSON."},
                {
                    "role": "user",
                    "content": "Grade from 0 (useless) to 5 (excellent) how well this document teaches "
                    f"reasoning.\n\n{excerpt(msg, self.params)}",
                },
            ],
            schema,
            "quality_score",
        )
        try:
            score = max(0, min(5, int(answer.get("score", 0))))
        except (TypeError, ValueError):
            raise RowError(f"score: not an integer score: {answer.get('score')!r}") from None
        msg.set_result("score", score)


class QuestionRole(LLMRole):
    async def run(self, msg: Orchestrator) -> None:
        schema = json_schema(
            {
                "question": {"type": "string"},
                "answer": {"type": "string"},
                "reasoning": {"type": "string"},
            }
        )
        answer = await self.chat_json(
            msg,
            [
                {"role": "system", "content": "You write exam questions from documents. Answer in JSON."},
                {
                    "role": "user",
                    "content": "Write one question this document answers, the answer, and the reasoning "
                    f"that leads to it.\n\n{excerpt(msg, self.params)}",
                },
            ],
            schema,
            "qa_pair",
        )
        msg.set_result("question", {k: str(answer.get(k, "")) for k in ("question", "answer", "reasoning")})


class NaturalReasoningOrchestrator(Orchestrator):
    """Routing: filter, then score if kept, then question if the score is high enough."""

    min_score = 3

    def route(self, done: str | None) -> str | None:
        if done is None:
            return "filter"
        if done == "filter":
            verdict = self.results["filter"]
            if verdict["keep"]:
                return "score"
            self.finish(FILTERED, verdict["reason"])
            return None
        if done == "score":
            if self.results["score"] >= self.min_score:
                return "question"
            self.finish(FILTERED, f"score below {self.min_score} ({self.results['score']})")
            return None
        self.finish(OK)
        return None


def output(msg: Orchestrator) -> dict[str, Any]:
    qa = msg.results.get("question") or {}
    return {
        "url": msg.row.get("url"),
        "quality_score": msg.results.get("score"),
        "question": qa.get("question"),
        "answer": qa.get("answer"),
        "reasoning": qa.get("reasoning"),
    }


PIPELINE = Pipeline(
    name="natural_reasoning",
    orchestrator=NaturalReasoningOrchestrator,
    roles={"filter": FilterRole, "score": ScoreRole, "question": QuestionRole},
    admit=cheap_checks,
    check_params=check_params,
    columns=pa.schema(
        [
            pa.field("url", pa.string()),
            pa.field("quality_score", pa.int32()),
            pa.field("question", pa.string()),
            pa.field("answer", pa.string()),
            pa.field("reasoning", pa.string()),
        ]
    ),
    output=output,
)
