"""A coral-shaped workload for benchmarks: multi-turn, with a variable number of turns per row.

A proposer answers a question about a document; a critic reviews the whole conversation and
either agrees (the row is done) or asks for a revision, up to 8 rounds (16 LLM calls). Every turn
carries the growing history, so late turns have long prompts and messages: the shape of Coral's
collaborative-reasoning dialogues, where batch pipelines must unroll the loop into fixed stages.
On the simulator the critic agrees with probability `agree_rate` per round (deterministic per
conversation), so both runners see the same dialogues.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from matrix_provider.runtime.orchestrator import FILTERED, OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import LLMRole, json_schema


def _conversation(msg: Orchestrator, params: dict[str, Any]) -> list[dict[str, Any]]:
    text = str(msg.row["text"])[: params.get("max_chars", 600)]
    turns = [{"role": "user", "content": f"Explain the main claim of this document and why it holds.\n\n{text}"}]
    for turn in msg.history:
        speaker = "assistant" if turn["role"] == "proposer" else "user"
        turns.append({"role": speaker, "content": turn["content"]})
    return turns


class ProposerRole(LLMRole):
    async def run(self, msg: Orchestrator) -> None:
        messages = [{"role": "system", "content": "You explain documents carefully."}, *_conversation(msg, self.params)]
        completion = await self.chat(msg, messages)
        msg.add_turn("proposer", completion.text)


class CriticRole(LLMRole):
    async def run(self, msg: Orchestrator) -> None:
        schema = json_schema(
            {
                "agree": {"type": "boolean", "x-sim-true-rate": self.params.get("agree_rate", 0.3)},
                "comment": {"type": "string"},
            }
        )
        messages = [
            {"role": "system", "content": "You review explanations. Agree only if it is correct. Answer in JSON."},
            *_conversation(msg, self.params),
        ]
        answer = await self.chat_json(msg, messages, schema, "review")
        msg.add_turn("critic", str(answer.get("comment", "")), agree=bool(answer.get("agree", False)))


class CoralOrchestrator(Orchestrator):
    """proposer -> critic -> (agreed: done | proposer again), at most `max_rounds` rounds."""

    max_rounds = 8

    def route(self, done: str | None) -> str | None:
        if done is None:
            return "proposer"
        if done == "proposer":
            return "critic"
        if self.history[-1].get("agree"):
            self.finish(OK)
            return None
        if self.rounds() >= self.max_rounds:
            self.finish(FILTERED, f"no agreement after {self.max_rounds} rounds")
            return None
        return "proposer"

    def rounds(self) -> int:
        return sum(turn["role"] == "critic" for turn in self.history)


def output(msg: Orchestrator) -> dict[str, Any]:
    return {"rounds": msg.rounds(), "agreed": msg.status == OK}  # type: ignore[attr-defined]


PIPELINE = Pipeline(
    name="coral_shaped",
    orchestrator=CoralOrchestrator,
    roles={"proposer": ProposerRole, "critic": CriticRole},
    columns=pa.schema([pa.field("rounds", pa.int32()), pa.field("agreed", pa.bool_())]),
    output=output,
)
