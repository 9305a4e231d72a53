"""The coral pipeline: matcher and routing with scripted replies, then `matrix run` on sim and SmolLM2."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from matrix_provider.llm.client import Completion
from matrix_provider.pipelines.coral import PIPELINE, CoralOrchestrator, same_answer
from matrix_provider.protocol import parse_manifest
from matrix_provider.runtime.pipeline import output_row
from matrix_provider.runtime.roles import RowError
from matrix_provider.runtime.spec import RoleSpec
from tests.conftest import REPO, assert_exactly_once, read_manifest, read_output, run_matrix

QUESTIONS = REPO / "matrix_provider" / "data" / "coral" / "questions.jsonl"
QUESTION = {"id": "q1", "question": "Tom has 3 bags of 6 apples. How many apples has he?", "answer": "18"}
Script = Callable[[str, str, list[dict[str, Any]]], dict[str, Any]]


class ScriptedLLM:
    """Answers each JSON call from a script of (schema name, speaker, messages) -> JSON object."""

    def __init__(self, script: Script):
        self.script = script

    async def chat(self, messages: list[dict[str, Any]], **kw: Any) -> Completion:
        name = kw["response_format"]["json_schema"]["name"]
        speaker = re.match(r"You are (\w+)", messages[0]["content"])
        reply = self.script(name, speaker.group(1) if speaker else "", messages)
        return Completion(json.dumps(reply), prompt_tokens=10, completion_tokens=5, finish_reason="stop")


def last_number(messages: list[dict[str, Any]]) -> dict[str, str]:
    """The extractor's part of a script: the last number of the solution it is shown."""
    solution = messages[-1]["content"].split("Solution:", 1)[1]
    return {"answer": re.findall(r"\d+", solution)[-1]}


def discuss(row: dict[str, Any], script: Script, max_turns: int = 4) -> dict[str, Any]:
    """Run one row through the pipeline's roles and routing in process; returns its output row."""
    llm = ScriptedLLM(script)
    params = {"max_turns": max_turns, "tolerance": 1e-6}
    roles = {name: cls(name, RoleSpec(), params, llm) for name, cls in PIPELINE.roles.items()}
    msg = CoralOrchestrator(id=row["id"], partition=0, delivery=1, deadline=time.time() + 60, row=row)

    async def go() -> None:
        role = msg.route(None)
        while role is not None:
            await roles[role].run(msg)
            role = msg.route(role)

    asyncio.run(go())
    return output_row(PIPELINE, msg)


def answers(a: str, b: str, agree_b: bool) -> Script:
    """Alice always argues for `a`, Bob for `b`; Bob says he agrees when `agree_b`; Alice never does
    (she tries to agree on her first turn, before anyone else spoke: that must not count)."""

    def script(name: str, speaker: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        if name == "final_answer":
            return last_number(messages)
        if speaker == "Alice":
            return {"message": f"3 bags of 6 make {a}.", "agree": len(messages) == 2}
        return {"message": f"I count {b}.", "agree": agree_b}

    return script


@pytest.mark.parametrize(
    ("a", "b", "tolerance", "same"),
    [
        ("$1,200.", "1200", 1e-6, True),
        ("18 dollars", "18.0", 1e-6, True),
        ("so 3 + 4 = 7", "7", 1e-6, True),  # the last number is the answer
        ("3.5", "3.50001", 1e-6, False),
        ("3.5", "3.50001", 1e-3, True),
        ("Paris.", "paris", 1e-6, True),
        ("blue", "red", 1e-6, False),
        ("", "", 1e-6, False),  # no answer never agrees
        ("-4", "4", 1e-6, False),
    ],
)
def test_matcher_normalises_and_compares_numbers_within_tolerance(a: str, b: str, tolerance: float, same: bool) -> None:
    assert same_answer(a, b, tolerance) is same


def test_routing_alternates_agents_then_extracts_and_matches() -> None:
    msg = CoralOrchestrator(id="q", partition=0, delivery=1, deadline=0.0, row=QUESTION)
    assert msg.route(None) == "agent_a"
    msg.history.append({"role": "agent_a", "content": "18", "agree": False, "ends": None})
    assert msg.route("agent_a") == "agent_b"
    msg.history.append({"role": "agent_b", "content": "17", "agree": False, "ends": None})
    assert msg.route("agent_b") == "agent_a"
    msg.history.append({"role": "agent_a", "content": "18", "agree": False, "ends": "max_turns"})
    assert msg.route("agent_a") == "extract"
    assert msg.route("extract") == "match"
    assert msg.route("match") is None and msg.status == "ok"


@pytest.mark.parametrize("gold", [None, "", "  "])
def test_a_row_without_gold_is_an_error_before_any_llm_call(gold: str | None) -> None:
    row = {"id": "g", "question": "2+2?", **({} if gold is None else {"answer": gold})}
    msg = CoralOrchestrator(id="g", partition=0, delivery=1, deadline=0.0, row=row)
    assert msg.route(None) is None
    assert msg.status == "error" and "'g'" in msg.error and "gold" in msg.error


def test_scripted_agents_that_agree_on_the_gold_answer_are_correct() -> None:
    row = discuss(QUESTION, answers("18", "18", agree_b=True))
    assert (row["status"], row["answer_a"], row["answer_b"]) == ("ok", "18", "18")
    assert row["agreed"] and row["correct"]
    assert (row["turns"], row["ended_by"]) == (2, "agreement")
    conversation = json.loads(row["conversation"])
    assert [t["role"] for t in conversation] == ["agent_a", "agent_b"]
    assert [t["agree"] for t in conversation] == [False, True]  # Alice's first-turn agree did not count


def test_scripted_agents_that_agree_on_a_wrong_answer_are_agreed_not_correct() -> None:
    row = discuss(QUESTION, answers("17", "17", agree_b=True))
    assert row["agreed"] and not row["correct"]


def test_scripted_agents_that_disagree_stop_at_max_turns_not_agreed() -> None:
    row = discuss(QUESTION, answers("18", "17", agree_b=False), max_turns=5)
    assert (row["answer_a"], row["answer_b"]) == ("18", "17")
    assert not row["agreed"] and not row["correct"]
    assert (row["turns"], row["ended_by"]) == (5, "max_turns")
    assert [t["role"] for t in json.loads(row["conversation"])] == ["agent_a", "agent_b"] * 2 + ["agent_a"]


def test_saying_agree_on_different_answers_ends_the_talk_but_is_not_agreement() -> None:
    row = discuss(QUESTION, answers("18", "17", agree_b=True))
    assert row["ended_by"] == "agreement" and not row["agreed"]


def _run(cluster: Any, input_dir: Path, output: Path, overrides: list[str], timeout: float) -> dict[str, Any]:
    args = ["run", "coral", "--input", str(input_dir), "--output", str(output), "--manifest-json", *overrides]
    result = run_matrix(args, cluster.env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = parse_manifest(result.stdout)
    assert manifest == {k: v for k, v in read_manifest(str(output)).items() if k != "spec"}
    return manifest


def test_sim_run_over_the_bundled_questions_and_bad_rows(ray_cluster, tmp_path: Path) -> None:
    input_dir = tmp_path / "in"
    input_dir.mkdir()
    shutil.copy(QUESTIONS, input_dir / "questions.jsonl")
    bad = [
        {"id": "no-gold", "question": "What is 2 + 2?"},
        {"id": "null-gold", "question": "What is 3 + 3?", "answer": None},
        {"id": "no-question", "answer": "4"},
    ]
    (input_dir / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    out = tmp_path / "out"
    manifest = _run(ray_cluster, input_dir, out, ["llm=sim", "llm.decode_s_per_token=0.0005"], timeout=180)

    rows = read_output(str(out))
    assert_exactly_once(rows, 103)
    by_id = {r["id"]: r for r in rows}
    for row_id in ("no-gold", "null-gold"):
        assert by_id[row_id]["status"] == "error" and f"'{row_id}'" in by_id[row_id]["error"]
        assert by_id[row_id]["prompt_tokens"] == 0
    assert "missing field 'question'" in by_id["no-question"]["error"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 100 == manifest["rows_ok"] and manifest["rows_error"] == 3
    for row in ok:
        conversation = json.loads(row["conversation"])
        assert len(conversation) == row["turns"] and 2 <= row["turns"] <= 6
        assert row["ended_by"] == ("agreement" if conversation[-1]["agree"] else "max_turns")
        assert row["correct"] == (row["agreed"] and same_answer(row["answer_a"], row["gold"]))
    summary = manifest["summary"]
    assert summary == {
        "questions_answered": 100,
        "agreement_rate": round(sum(r["agreed"] for r in ok) / 100, 4),
        "agreement_correctness": round(sum(r["correct"] for r in ok) / 100, 4),
        "consensus_rate": round(sum(r["ended_by"] == "agreement" for r in ok) / 100, 4),
        "mean_turns": round(statistics.mean(r["turns"] for r in ok), 3),
    }
    # Every discussion ended, some by agreement and some at max_turns (sim_agree_rate 0.4 a turn).
    assert 0 < summary["consensus_rate"] < 1
    print(f"\ncoral sim: {summary}")


def test_embedded_smollm2_discusses_two_questions(ray_cluster, tmp_path: Path) -> None:
    input_dir = tmp_path / "in"
    input_dir.mkdir()
    lines = QUESTIONS.read_text().splitlines()[:2]
    (input_dir / "q.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    overrides = [
        "llm=embedded",
        "params.max_turns=2",
        "roles.agent_a.max_tokens=160",
        "roles.agent_b.max_tokens=160",
    ]
    manifest = _run(ray_cluster, input_dir, out, overrides, timeout=300)
    rows = read_output(str(out))
    assert_exactly_once(rows, 2)
    assert manifest["summary"]["questions_answered"] == manifest["rows_ok"]
    for row in rows:
        if row["status"] == "ok":
            assert row["turns"] == 2 and row["answer_a"] is not None and row["answer_b"] is not None
        else:  # a small model may still cut its JSON off: the row says so, the run goes on
            assert "max_tokens" in row["error"] or "JSON" in row["error"], row["error"]
    print(f"\ncoral embedded: {manifest['summary']}; rows: {[(r['answer_a'], r['answer_b'], r['gold']) for r in rows]}")


def test_a_failed_extract_waits_for_its_sibling_so_the_row_counts_every_token() -> None:
    """One agent's answer is cut off at once, the other's comes later: the row must carry both calls'
    tokens (vLLM counted a call that was still out when the row was reported)."""

    class OneBrokenLLM:
        async def chat(self, messages: list[dict[str, Any]], **kw: Any) -> Completion:
            if "Alice" in messages[-1]["content"]:
                return Completion('{"answer": "1', prompt_tokens=10, completion_tokens=5, finish_reason="length")
            await asyncio.sleep(0.2)
            return Completion('{"answer": "18"}', prompt_tokens=10, completion_tokens=5, finish_reason="stop")

    extract = PIPELINE.roles["extract"]("extract", RoleSpec(), {}, OneBrokenLLM())
    msg = CoralOrchestrator(id="q1", partition=0, delivery=1, deadline=time.time() + 60, row=QUESTION)
    msg.history = [{"role": "agent_a", "content": "Alice says 18."}, {"role": "agent_b", "content": "Bob: 18."}]
    with pytest.raises(RowError, match="cut off at max_tokens"):
        asyncio.run(extract.run(msg))
    assert msg.usage == {"prompt_tokens": 20, "completion_tokens": 10}
