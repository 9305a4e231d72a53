"""Collaborative Reasoner (Coral, as in Meta's Matrix paper): two agents discuss a question.

- agent_a, agent_b: the same model under two personas takes turns. Each turn is a message to the
  partner plus whether the speaker now agrees with the partner's latest answer. The discussion
  ends at the first agreement (from the second turn on) or after `max_turns` turns in all.
- extract: the LLM pulls each agent's final answer from that agent's last turn.
- match: plain Python. `agreed` when both answers are the same after normalisation (numbers
  within `tolerance`), `correct` when they agree on the gold answer (Coral's agreement-correctness).

Input rows: `question` and its gold `answer`; a row without a gold answer is an error row before
any LLM call. On the `sim` backend agreement comes from `sim_agree_rate` and answers are random
words, so runs end but are rarely correct: use a real model for quality figures.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import pyarrow as pa

from matrix_provider.runtime.orchestrator import ERROR, OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import LLMRole, Role, RowError, json_schema
from matrix_provider.runtime.summary import Summary

AGENTS = ("agent_a", "agent_b")
PERSONAS = {"agent_a": "Alice", "agent_b": "Bob"}
GOLD_FIELD = "answer"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def partner(agent: str) -> str:
    return AGENTS[1 - AGENTS.index(agent)]


def dialogue(msg: Orchestrator, agent: str) -> list[dict[str, str]]:
    """The discussion as `agent` sees it: its own turns as assistant, the partner's as user."""
    turns = [{"role": "user", "content": f"Question: {msg.row['question']}"}]
    for turn in msg.history:
        if turn["role"] == agent:
            turns.append({"role": "assistant", "content": turn["content"]})
        else:
            turns.append({"role": "user", "content": f"{PERSONAS[turn['role']]}: {turn['content']}"})
    return turns


class AgentRole(LLMRole):
    """One turn of one agent; the role name (agent_a or agent_b) picks the persona."""

    async def run(self, msg: Orchestrator) -> None:
        max_turns = int(self.params.get("max_turns", 6))
        if max_turns < 2:
            raise RowError(f"params.max_turns is {max_turns}: a discussion needs at least 2 turns")
        me, other = PERSONAS[self.name], PERSONAS[partner(self.name)]
        schema = json_schema(
            {
                "message": {"type": "string"},
                "agree": {"type": "boolean", "x-sim-true-rate": float(self.params.get("sim_agree_rate", 0.4))},
            }
        )
        system = (
            f"You are {me}. You and {other} solve a question together. Reason step by step and end your "
            f"message with your final answer. If {other}'s latest answer is right, say so and set agree to "
            "true; if not, explain the mistake and set agree to false. Answer in JSON."
        )
        answer = await self.chat_json(
            msg, [{"role": "system", "content": system}, *dialogue(msg, self.name)], schema, "turn"
        )
        turn = len(msg.history) + 1
        agree = turn > 1 and answer.get("agree") is True
        ends = "agreement" if agree else "max_turns" if turn >= max_turns else None
        msg.add_turn(self.name, str(answer.get("message", "")), agree=agree, ends=ends)


class ExtractRole(LLMRole):
    """Each agent's final answer, read from its last turn."""

    async def run(self, msg: Orchestrator) -> None:
        last = {turn["role"]: turn["content"] for turn in msg.history}
        # Both calls finish before the step does, even when one fails: a call still out when the row
        # is reported would spend tokens the row never counts (vLLM's own counters showed it).
        answers = await asyncio.gather(*(self._extract(msg, last[agent]) for agent in AGENTS), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        msg.set_result("extract", dict(zip(AGENTS, answers, strict=True)))

    async def _extract(self, msg: Orchestrator, message: str) -> str:
        answer = await self.chat_json(
            msg,
            [
                {"role": "system", "content": "You read solutions and report their final answer. Answer in JSON."},
                {
                    "role": "user",
                    "content": f"Question: {msg.row['question']}\n\nSolution: {message}\n\n"
                    "What final answer does this solution give? Give only the answer (a number for a math "
                    "question), without units or explanation.",
                },
            ],
            json_schema({"answer": {"type": "string"}}),
            "final_answer",
        )
        return str(answer.get("answer", "")).strip()


def normalize(answer: str) -> str | float | None:
    """An answer as a number when it holds one (the last, as in '... so the total is $1,200.'),
    else as lower-case words; None when empty."""
    numbers = _NUMBER.findall(answer)
    if numbers:
        return float(numbers[-1].replace(",", ""))
    words = re.sub(r"[^\w\s]", " ", answer.lower()).split()
    return " ".join(words) or None


def same_answer(a: str, b: str, tolerance: float = 1e-6) -> bool:
    """Equal after normalisation; numbers within a relative or absolute `tolerance`."""
    x, y = normalize(a), normalize(b)
    if x is None or y is None:
        return False
    if isinstance(x, float) and isinstance(y, float):
        return math.isclose(x, y, rel_tol=tolerance, abs_tol=tolerance)
    return x == y


class MatchRole(Role):
    """Agreement and correctness, in plain Python."""

    async def run(self, msg: Orchestrator) -> None:
        tolerance = float(self.params.get("tolerance", 1e-6))
        a, b = (msg.results["extract"][agent] for agent in AGENTS)
        agreed = same_answer(a, b, tolerance)
        correct = agreed and same_answer(a, gold(msg.row), tolerance)
        msg.set_result("match", {"agreed": agreed, "correct": correct})


def gold(row: dict[str, Any]) -> str:
    value = row.get(GOLD_FIELD)
    return "" if value is None else str(value).strip()


class CoralOrchestrator(Orchestrator):
    """agent_a <-> agent_b until a turn ends the discussion, then extract, then match."""

    def route(self, done: str | None) -> str | None:
        if done is None:
            if not gold(self.row):
                self.finish(ERROR, f"row {self.id!r} has no gold answer (field {GOLD_FIELD!r})")
                return None
            return AGENTS[0]
        if done in AGENTS:
            return "extract" if self.history[-1]["ends"] else partner(done)
        if done == "extract":
            return "match"
        self.finish(OK)
        return None


def output(msg: Orchestrator) -> dict[str, Any]:
    answers = msg.results.get("extract") or {}
    match = msg.results.get("match") or {}
    return {
        "question": msg.row.get("question"),
        "gold": gold(msg.row),
        "answer_a": answers.get("agent_a"),
        "answer_b": answers.get("agent_b"),
        "agreed": match.get("agreed"),
        "correct": match.get("correct"),
        "turns": len(msg.history),
        "ended_by": msg.history[-1]["ends"] if msg.history else None,
        "conversation": json.dumps(msg.history, ensure_ascii=False),
    }


def summary_row(row: dict[str, Any]) -> dict[str, int]:
    """An answered (ok) row's share of the summary: one question, its agreement, correctness, turns."""
    if row["status"] != OK:
        return {}
    return {
        "answered": 1,
        "agreed": int(bool(row["agreed"])),
        "correct": int(bool(row["correct"])),
        "consensus": int(row["ended_by"] == "agreement"),
        "turns": row["turns"] or 0,
    }


def summary_finish(total: dict[str, Any]) -> dict[str, Any]:
    """Agreement rate, agreement-correctness and mean turns over the answered (ok) rows.

    `consensus_rate` is how often the agents said they agree: above `agreement_rate` when they
    agree in words on answers that differ (always, on the simulator).
    """
    n = total.get("answered", 0)

    def share(key: str, digits: int = 4) -> float | None:
        return round(total.get(key, 0) / n, digits) if n else None

    return {
        "questions_answered": n,
        "agreement_rate": share("agreed"),
        "agreement_correctness": share("correct"),
        "consensus_rate": share("consensus"),
        "mean_turns": share("turns", 3),
    }


PIPELINE = Pipeline(
    name="coral",
    orchestrator=CoralOrchestrator,
    roles={"agent_a": AgentRole, "agent_b": AgentRole, "extract": ExtractRole, "match": MatchRole},
    columns=pa.schema(
        [
            pa.field("question", pa.string()),
            pa.field("gold", pa.string()),
            pa.field("answer_a", pa.string()),
            pa.field("answer_b", pa.string()),
            pa.field("agreed", pa.bool_()),
            pa.field("correct", pa.bool_()),
            pa.field("turns", pa.int32()),
            pa.field("ended_by", pa.string()),  # agreement | max_turns
            pa.field("conversation", pa.string()),  # JSON list of {role, content, agree, ends}
        ]
    ),
    output=output,
    summary=Summary(summary_row, summary_finish, columns=("agreed", "correct", "turns", "ended_by")),
)
