"""The load simulator's engine model, without HTTP: determinism, faults, schemas, capacity."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest

from matrix_provider.llm.sim import SimEngine, fake_value
from matrix_provider.llm.sim_gpu import BLOCK_CHARS, GPU_MODELS, Scheduler, Seq, prompt_blocks
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


def _drain(scheduler: Scheduler) -> tuple[float, list[Seq]]:
    """Step until idle: (modelled seconds, sequences in the order they finished)."""
    total, order = 0.0, []
    while scheduler.busy:
        seconds, finished = scheduler.step()
        total += seconds
        order.extend(finished)
    return total, order


def test_a_step_takes_the_longer_of_memory_and_compute() -> None:
    gpu = GPU_MODELS["vllm-like"]
    overhead = gpu.step_overhead_s + gpu.seq_overhead_s
    weights = gpu.weight_bytes / gpu.hbm_bytes_per_s
    assert gpu.step_s(1, 1, 100) - overhead == pytest.approx(weights, rel=0.01)  # decode: memory-bound
    prefill = gpu.step_s(1, 2048, 2048) - overhead
    assert prefill == pytest.approx(2048 * gpu.flops_per_token / gpu.flops_per_s)  # prefill: compute-bound
    assert prefill / 2048 >= 51e-6  # an 8B model's floor on an A100


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode() -> None:
    gpu = replace(GPU_MODELS["vllm-like"], max_batched_tokens=1000)
    scheduler = Scheduler(gpu)
    decoding = Seq(10, 50)
    scheduler.add(decoding)
    scheduler.step()
    long = Seq(3500, 1)
    scheduler.add(long)
    for _ in range(3):  # 999 tokens a step beside the one decode token: 3 steps of chunks, no token yet
        scheduler.step()
        assert long.generated == 0 and decoding.generated > 1
    scheduler.step()
    assert long.generated == 1


def test_the_prefix_cache_spares_a_dialogue_the_turns_it_had_already_sent() -> None:
    first = "system prompt and the first question " * 40
    second = first + "the first answer and the second question " * 10
    sticky = Scheduler(GPU_MODELS["vllm-like"])
    for text in (first, second):
        sticky.add(Seq(len(text) // 4, 4, prompt_blocks(text)))
        _drain(sticky)
    assert sticky.cached_tokens >= len(first) // 4 - BLOCK_CHARS // 4
    elsewhere = Scheduler(GPU_MODELS["vllm-like"])  # the second turn on another replica: all prefilled
    elsewhere.add(Seq(len(second) // 4, 4, prompt_blocks(second)))
    _drain(elsewhere)
    assert elsewhere.cached_tokens == 0


def test_kv_pressure_preempts_and_every_sequence_still_finishes() -> None:
    scheduler = Scheduler(replace(GPU_MODELS["vllm-like"], kv_tokens=4000))
    seqs = [Seq(100, 200, ticket=i) for i in range(20)]  # 6,000 tokens of KV wanted at the end
    for seq in seqs:
        scheduler.add(seq)
    _, finished = _drain(scheduler)
    assert scheduler.preemptions > 0
    assert sorted(s.ticket for s in finished) == list(range(20))
    assert all(s.generated == 200 for s in finished) and scheduler.free == scheduler.blocks
