"""The LLM client against real simulator replicas: sticky routing, balancing, retries, errors."""

from __future__ import annotations

import asyncio
import collections

import pytest

from matrix_provider.llm.client import ClientConfig, LLMClient, LLMError
from matrix_provider.llm.sim_server import deploy_sim
from matrix_provider.llm.spec import SimSpec


def _client(endpoints: tuple[str, ...], **kw) -> LLMClient:
    return LLMClient(ClientConfig(endpoints=endpoints, model="sim", timeout_s=5, backoff_s=0.01, **kw))


def test_sticky_keys_stay_on_one_replica_and_keys_spread(ray_client) -> None:
    spec = SimSpec(backend="sim", replicas=3, decode_s_per_token=0.0)
    endpoints = deploy_sim(spec, "test-client-sticky")
    assert len(set(endpoints)) == 3

    async def go():
        client = _client(endpoints)
        seen = collections.defaultdict(set)
        for key in [f"row-{i}" for i in range(60)]:
            for _ in range(3):
                c = await client.chat([{"role": "user", "content": "hi"}], sticky_key=key, max_tokens=4)
                seen[key].add(c.replica)
        await client.aclose()
        return seen

    seen = asyncio.run(go())
    assert all(len(replicas) == 1 for replicas in seen.values())
    spread = collections.Counter(next(iter(r)) for r in seen.values())
    assert len(spread) == 3 and min(spread.values()) >= 8, spread


def test_server_errors_are_retried_and_counted(ray_client) -> None:
    endpoints = deploy_sim(SimSpec(backend="sim", error_rate=0.3, rate_limit_rate=0.2), "test-client-faults")

    async def go():
        client = _client(endpoints, retries=8)
        results = await asyncio.gather(
            *(client.chat([{"role": "user", "content": f"q{i}"}], sticky_key=str(i), max_tokens=4) for i in range(50))
        )
        stats = client.stats
        await client.aclose()
        return results, stats

    results, stats = asyncio.run(go())
    assert len(results) == 50 and all(r.completion_tokens > 0 for r in results)
    assert stats.retries > 10 and stats.failures == 0
    assert any(r.attempts > 1 for r in results)


def test_context_overflow_fails_at_once_with_the_reason(ray_client) -> None:
    endpoints = deploy_sim(SimSpec(backend="sim", n_ctx=64), "test-client-ctx")

    async def go():
        client = _client(endpoints)
        try:
            await client.chat([{"role": "user", "content": "word " * 500}], sticky_key="k", max_tokens=4)
        finally:
            await client.aclose()

    with pytest.raises(LLMError) as err:
        asyncio.run(go())
    assert err.value.status == 400 and not err.value.retryable
    assert "exceeds the available context size" in str(err.value)


def test_refused_connection_is_retryable_and_named() -> None:
    async def go():
        client = _client(("http://127.0.0.1:9/v1",), retries=1)
        try:
            await client.complete("hi", sticky_key="k", max_tokens=1)
        finally:
            await client.aclose()

    with pytest.raises(LLMError, match=r"127\.0\.0\.1:9/v1 unreachable"):
        asyncio.run(go())
