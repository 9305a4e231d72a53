"""The real embedded engine (SmolLM2 via llama.cpp) as a Ray Serve app, through our client."""

from __future__ import annotations

import asyncio
import collections

from matrix_provider.llm import backends
from matrix_provider.llm.client import LLMClient
from matrix_provider.llm.spec import EmbeddedSpec


def test_embedded_chat_completion_usage_balancing_and_stickiness(ray_client) -> None:
    spec = EmbeddedSpec(
        backend="embedded", replicas=2, n_parallel=2, n_threads=1, n_ctx=1024, app_name="test-embedded-2r"
    )
    config = backends.deploy(spec)
    backends.probe(config)

    async def go():
        client = LLMClient(config)
        chat = await client.chat([{"role": "user", "content": "Name a color."}], sticky_key="a", max_tokens=8)
        completion = await client.complete("The capital of France is", sticky_key="a", max_tokens=8)
        sticky = [
            await client.chat([{"role": "user", "content": f"Say {i}."}], sticky_key="row-7", max_tokens=2)
            for i in range(4)
        ]
        spread = await asyncio.gather(
            *(client.chat([{"role": "user", "content": "Hi"}], sticky_key=f"row-{i}", max_tokens=2) for i in range(16))
        )
        await client.aclose()
        return chat, completion, sticky, spread

    chat, completion, sticky, spread = asyncio.run(go())
    assert chat.text and chat.prompt_tokens > 0 and 0 < chat.completion_tokens <= 8
    assert completion.text and completion.prompt_tokens > 0 and completion.completion_tokens > 0
    assert len({c.replica for c in sticky}) == 1, "one row's turns must stay on one replica"
    by_replica = collections.Counter(c.replica for c in spread)
    assert len(by_replica) == 2, f"16 rows should reach both replicas: {by_replica}"


def test_context_overflow_is_a_row_error_with_the_reason(ray_client) -> None:
    spec = EmbeddedSpec(
        backend="embedded", replicas=1, n_parallel=1, n_threads=1, n_ctx=256, app_name="test-embedded-ctx"
    )
    config = backends.deploy(spec)

    async def go():
        client = LLMClient(config)
        try:
            await client.chat([{"role": "user", "content": "word " * 2000}], sticky_key="x", max_tokens=2)
        except Exception as exc:
            return exc
        finally:
            await client.aclose()

    err = asyncio.run(go())
    assert "exceeds the available context size" in str(err) and not err.retryable
