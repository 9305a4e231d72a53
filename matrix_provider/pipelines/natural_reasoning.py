"""NaturalReasoning-style web curation: filter -> score -> question.

- admission (in the partition driver, before any hop): cheap checks (length, English, density of
  reasoning cues); most documents stop here, as in the paper (~5 % survive at DCLM scale).
- filter: a small LLM classification of the documents that passed.
- score: the LLM grades the document's educational reasoning quality 0-5; below
  `min_score` the row is filtered.
- question: the LLM extracts a question, its answer and the reasoning chain.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from matrix_provider.runtime.orchestrator import FILTERED, OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import LLMRole, RowError, json_schema

_WORD = re.compile(r"[A-Za-z']+")
_STOPWORDS = frozenset(
    [
        "the",
        "of",
        "and",
        "to",
        "a",
        "in",
        "is",
        "that",
        "it",
        "for",
        "as",
        "with",
        "be",
        "on",
        "this",
        "are",
        "by",
        "not",
        "or",
        "can",
        "an",
        "if",
    ]
)
_CUES = frozenset(
    [
        "because",
        "therefore",
        "thus",
        "hence",
        "since",
        "so",
        "why",
        "how",
        "if",
        "then",
        "must",
        "implies",
        "means",
        "example",
        "reason",
        "consequently",
        "however",
        "although",
        "whereas",
        "suppose",
        "assume",
    ]
)


def heuristic_verdict(text: str, params: dict[str, Any]) -> str | None:
    """None when the document may hold reasoning, else why it is filtered."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < params.get("min_words", 150):
        return f"too short ({len(words)} words)"
    stop_share = sum(w in _STOPWORDS for w in words) / len(words)
    if stop_share < params.get("min_stopword_share", 0.15):
        return f"not English prose (stopword share {stop_share:.2f})"
    cue_density = 1000 * sum(w in _CUES for w in words) / len(words)
    if cue_density < params.get("min_cues_per_1000_words", 24.0):
        return f"few reasoning cues ({cue_density:.1f} per 1000 words)"
    return None


def excerpt(msg: Orchestrator, params: dict[str, Any]) -> str:
    return str(msg.row["text"])[: params.get("max_chars", 1000)]


def cheap_checks(row: dict[str, Any], params: dict[str, Any]) -> str | None:
    """The admission check: runs in the partition driver, so a dropped document costs no hop."""
    return heuristic_verdict(str(row["text"]), params)


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
