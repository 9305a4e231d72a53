"""The load simulator's engine model, without HTTP: determinism, faults, schemas, capacity."""

from __future__ import annotations

import asyncio
import json
import time

from matrix_provider.llm.sim import SimEngine, fake_value
from matrix_provider.llm.spec import SimSpec


def _spec(**kw) -> SimSpec:
    return SimSpec(backend="sim", **{"decode_s_per_token": 0.0, "prefill_s_per_token": 0.0, **kw})


def _chat(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 64, **extra}


def test_same_seed_same_answers_and_a_retry_draws_afresh() -> None:
    a, b = SimEngine(_spec(seed=7)), SimEngine(_spec(seed=7))
    other = SimEngine(_spec(seed=8))

    async def go():
        bodies = [_chat(f"row {i}") for i in range(20)]
        ra = [await a.handle("/v1/chat/completions", x) for x in bodies]
        rb = [await b.handle("/v1/chat/completions", x) for x in bodies]
        ro = [await other.handle("/v1/chat/completions", x) for x in bodies]
        retry = [await a.handle("/v1/chat/completions", x, attempt=2) for x in bodies]
        return ra, rb, ro, retry

    ra, rb, ro, retry = asyncio.run(go())
    assert [r.body["choices"] for r in ra] == [r.body["choices"] for r in rb]
    assert [r.body["choices"] for r in ra] != [r.body["choices"] for r in ro]
    assert [r.body["choices"] for r in ra] != [r.body["choices"] for r in retry]


def test_fault_rates_are_honoured() -> None:
    engine = SimEngine(_spec(error_rate=0.2, rate_limit_rate=0.1, timeout_rate=0.1))

    async def go():
        return [await engine.handle("/v1/chat/completions", _chat(f"r{i}")) for i in range(2000)]

    replies = asyncio.run(go())
    share = lambda cond: sum(map(cond, replies)) / len(replies)  # noqa: E731
    assert abs(share(lambda r: r.status == 500) - 0.2) < 0.03
    assert abs(share(lambda r: r.status == 429) - 0.1) < 0.03
    assert abs(share(lambda r: r.hang) - 0.1) < 0.03


def test_json_schema_and_tool_calls_are_valid() -> None:
    engine = SimEngine(_spec(tool_call_rate=1.0))
    schema = {
        "type": "object",
        "required": ["score", "ok", "tags"],
        "properties": {
            "score": {"type": "integer", "minimum": 0, "maximum": 5},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
        },
    }
    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"key": {"type": "string"}, "limit": {"type": "integer"}}},
        },
    }

    async def go():
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        structured = await engine.handle("/v1/chat/completions", _chat("grade", response_format=fmt))
        called = await engine.handle("/v1/chat/completions", _chat("use a tool", tools=[tool]))
        return structured, called

    structured, called = asyncio.run(go())
    value = json.loads(structured.body["choices"][0]["message"]["content"])
    assert 0 <= value["score"] <= 5 and isinstance(value["ok"], bool) and set(value["tags"]) <= {"a", "b"}
    call = called.body["choices"][0]["message"]["tool_calls"][0]["function"]
    args = json.loads(call["arguments"])
    assert call["name"] == "lookup" and isinstance(args["key"], str) and isinstance(args["limit"], int)
    assert called.body["choices"][0]["finish_reason"] == "tool_calls"


def test_prompt_longer_than_context_is_a_400() -> None:
    engine = SimEngine(_spec(n_ctx=100))
    reply = asyncio.run(engine.handle("/v1/chat/completions", _chat("word " * 1000)))
    assert reply.status == 400 and "context size" in reply.body["error"]["message"]


def test_sim_true_rate_sets_boolean_share() -> None:
    import random

    rng = random.Random(0)
    draws = [fake_value({"type": "boolean", "x-sim-true-rate": 0.1}, rng) for _ in range(5000)]
    assert abs(sum(draws) / len(draws) - 0.1) < 0.02


def test_saturated_engine_delivers_its_capacity() -> None:
    spec = _spec(slots=8, decode_s_per_token=0.002, output_tokens_mean=20, output_tokens_sigma=0.0)
    engine = SimEngine(spec)

    async def go():
        started = time.monotonic()
        await asyncio.gather(*(engine.handle("/v1/chat/completions", _chat(f"r{i}")) for i in range(160)))
        return time.monotonic() - started

    elapsed = asyncio.run(go())
    measured = engine.completion_tokens / elapsed
    assert engine.capacity_tokens_per_s == 4000
    assert 0.8 * 4000 < measured <= 4000 * 1.02
