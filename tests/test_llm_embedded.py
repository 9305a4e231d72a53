"""The real embedded engine (SmolLM2 via llama.cpp) as a Ray Serve app, through our client."""

from __future__ import annotations

import asyncio
import collections
import time

from matrix_provider.llm import backends
from matrix_provider.llm.client import LLMClient
from matrix_provider.llm.spec import EmbeddedSpec
from matrix_provider.pipelines.natural_reasoning import NaturalReasoningOrchestrator, QuestionRole
from matrix_provider.runtime.sources import list_inputs, read_split
from matrix_provider.runtime.spec import compose
from tests.conftest import CORPUS

# Two replicas of two slots: enough for the balancing test; the question-role test reuses the app.
SMALL = EmbeddedSpec(backend="embedded", replicas=2, n_parallel=2, n_threads=1, n_ctx=1024, app_name="test-embedded-2r")


def test_embedded_chat_completion_usage_balancing_and_stickiness(ray_client) -> None:
    config = backends.deploy(SMALL)
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


def test_question_role_penalty_keeps_smollm2_out_of_a_loop(ray_client) -> None:
    """At temperature 0 SmolLM2-135M repeats one sentence on this page until max_tokens, cutting its
    JSON off; the shipped question role's frequency_penalty lets it close the JSON."""
    spec = compose("natural_reasoning", [], {"input": "-", "output": "-"})
    assert spec.roles["question"].frequency_penalty > 0
    fs, files = list_inputs(str(CORPUS), spec.io)
    page = next(
        r.row for f in files for r in read_split(fs, f, spec.io) if r.row and "5.6. Modifying Tables" in r.row["text"]
    )
    config = backends.deploy(SMALL)
    msg = NaturalReasoningOrchestrator(id="p", partition=0, delivery=1, deadline=time.time() + 600, row=page)

    async def go() -> None:
        client = LLMClient(config)
        try:
            await QuestionRole("question", spec.roles["question"], spec.params, client).run(msg)
        finally:
            await client.aclose()

    asyncio.run(go())
    qa = msg.results["question"]
    assert qa["question"] and qa["answer"] and qa["reasoning"], qa
    assert msg.usage["completion_tokens"] < spec.roles["question"].max_tokens, msg.usage
