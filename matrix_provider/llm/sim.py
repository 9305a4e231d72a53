"""The load simulator: an OpenAI-compatible model of a continuous-batching engine.

For benchmarks and fault injection only, never for real output. `slots` sequences decode at once;
a request waits for a slot, then takes `prefill_s_per_token * prompt_tokens +
decode_s_per_token * output_tokens`. So its completion-token capacity is exactly
`replicas * slots / decode_s_per_token` tokens/s, and busy slot-time is counted for utilization.
Draws (output length, faults, JSON values) come from a hash of the seed, the request body and the
client's attempt number (`x-matrix-attempt`), so a rerun gets the same answers while a retry of a
failed request gets a fresh draw.

Opt-in, `model: vllm-like` (`sim_gpu.GPU_MODELS`): a physical model of a GPU under vLLM's scheduler
(step time = max(memory, compute), chunked prefill, up to `slots` of its 256 sequences, KV paging
with preemption, a prefix cache per replica); so a bigger batch, a longer history or a prompt
burst makes every sequence slower, as on a GPU, and a dialogue whose turns come back to the same
replica skips the prefill of what it had said before. `prefill_s_per_token` and
`decode_s_per_token` do not apply to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from matrix_provider.llm.sim_gpu import GPU_MODELS, Scheduler, Seq, prompt_blocks
from matrix_provider.llm.spec import SimSpec

_WORDS = ("the", "model", "reasons", "about", "data", "step", "answer", "because", "so", "then")
HANG_S = 3600.0
_END_MARKER = re.compile(r"###[A-Z][A-Z-]*###")


@dataclass
class SimReply:
    status: int
    body: dict[str, Any]
    hang: bool = False


def count_tokens(text: str) -> int:
    """A cheap, stable token estimate (4 characters a token)."""
    return max(1, math.ceil(len(text) / 4))


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts = []
        for m in body["messages"]:
            content = m.get("content")
            parts.append(content if isinstance(content, str) else json.dumps(content))
        return "\n".join(parts)
    return str(body.get("prompt", ""))


class SimEngine:
    """The engine model, independent of HTTP so it can be measured directly."""

    def __init__(self, spec: SimSpec):
        self.spec = spec
        self._slots = asyncio.Semaphore(spec.slots)
        self.started = time.monotonic()
        self.busy_slot_s = 0.0
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0
        self._running: dict[int, tuple[float, float]] = {}  # request -> (got its slot at, modelled busy s)
        gpu = GPU_MODELS.get(spec.model)
        self.scheduler = Scheduler(gpu, spec.slots) if gpu is not None else None
        self._contexts = [0, 0]  # sequences finished, their summed mean contexts (prompt + half the output)
        self._wake: asyncio.Event | None = None

    @property
    def capacity_tokens_per_s(self) -> float:
        """Completion tokens/s of this replica with every slot busy (prefill excluded); for a step
        model, with as many sequences as slots and KV budget allow at the mean context seen so far."""
        if self.scheduler is not None:
            count, context = self._contexts
            return self.scheduler.gpu.capacity_tokens_per_s(context / count if count else 512.0, self.spec.slots)
        if self.spec.decode_s_per_token == 0:
            return math.inf
        return self.spec.slots / self.spec.decode_s_per_token

    def stats(self) -> dict[str, float]:
        """Figures so far; busy slot-time counts the modelled work done, also of running requests."""
        now = time.monotonic()
        scheduler = self.scheduler
        engine = (
            {}
            if scheduler is None
            else {
                "preemptions": scheduler.preemptions,
                "prefix_cache_queried_tokens": scheduler.prompt_tokens,
                "prefix_cache_hit_tokens": scheduler.cached_tokens,
            }
        )
        return {
            **engine,
            "capacity_tokens_per_s": self.capacity_tokens_per_s,
            "slots": self.spec.slots,
            "busy_slot_s": self.busy_slot_s + sum(min(now - t, busy) for t, busy in self._running.values()),
            "uptime_s": now - self.started,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "in_flight": self.in_flight,
        }

    def _rng(self, body: dict[str, Any], attempt: int) -> random.Random:
        key = hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()
        return random.Random(f"{self.spec.seed}|{key}|{attempt}")

    def output_tokens(self, rng: random.Random, max_tokens: int) -> int:
        s = self.spec
        mu = math.log(s.output_tokens_mean) - s.output_tokens_sigma**2 / 2
        draw = rng.lognormvariate(mu, s.output_tokens_sigma)
        return max(1, min(round(draw), s.output_tokens_max, max_tokens))

    async def handle(self, path: str, body: dict[str, Any], attempt: int = 1) -> SimReply:
        rng = self._rng(body, attempt)
        roll = rng.random()
        s = self.spec
        if roll < s.error_rate:
            return _error(500, "simulated server error", "server_error")
        if roll < s.error_rate + s.rate_limit_rate:
            return _error(429, "simulated rate limit", "rate_limit")
        if roll < s.error_rate + s.rate_limit_rate + s.timeout_rate:
            return SimReply(504, {}, hang=True)
        prompt_tokens = count_tokens(prompt_text(body))
        if prompt_tokens > s.n_ctx:
            return _error(
                400,
                f"request ({prompt_tokens} tokens) exceeds the available context size ({s.n_ctx} tokens)",
                "exceed_context_size_error",
            )
        max_tokens = int(body.get("max_tokens") or s.output_tokens_max)
        out_tokens = self.output_tokens(rng, max_tokens)
        message, out_tokens, finish = self._answer(path, body, rng, out_tokens)
        self.requests += 1
        self.in_flight += 1
        try:
            if self.scheduler is not None:
                await self._generate(prompt_tokens, out_tokens, prompt_blocks(prompt_text(body)))
                return self._reply(path, message, finish, prompt_tokens, out_tokens)
            async with self._slots:
                busy = s.prefill_s_per_token * prompt_tokens + s.decode_s_per_token * out_tokens
                key = id(message)
                self._running[key] = (time.monotonic(), busy)
                try:
                    await asyncio.sleep(busy)
                    self.busy_slot_s += busy
                finally:
                    del self._running[key]
        finally:
            self.in_flight -= 1
        return self._reply(path, message, finish, prompt_tokens, out_tokens)

    def _reply(self, path: str, message: dict[str, Any], finish: str, prompt_tokens: int, out_tokens: int) -> SimReply:
        s = self.spec
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += out_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": out_tokens,
            "total_tokens": prompt_tokens + out_tokens,
        }
        if path.endswith("/chat/completions"):
            choice = {"index": 0, "message": message, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": message["content"], "finish_reason": finish}
            obj = "text_completion"
        return SimReply(
            200, {"id": f"sim-{self.requests}", "object": obj, "model": s.model, "choices": [choice], "usage": usage}
        )

    async def _generate(self, prompt_tokens: int, out_tokens: int, blocks: tuple[int, ...]) -> None:
        """Queue a sequence for the step loop (started with the first request) and wait for its
        last token."""
        assert self.scheduler is not None
        if self._wake is None:
            self._wake = asyncio.Event()
            asyncio.get_running_loop().create_task(self._step_loop())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.scheduler.add(Seq(prompt_tokens, out_tokens, blocks, done))
        self._wake.set()
        await done

    async def _step_loop(self) -> None:
        """One engine step at a time; steps are scheduled on a clock, so a late event loop catches
        up (by at most 0.1 s) instead of slowing the modelled engine."""
        assert self.scheduler is not None and self._wake is not None
        scheduler = self.scheduler
        end = time.monotonic()
        while True:
            if not scheduler.busy:
                self._wake.clear()
                await self._wake.wait()
                end = time.monotonic()
                continue
            running = len(scheduler.running)
            dt, finished = scheduler.step()
            end = max(end + dt, time.monotonic() - 0.1)
            await asyncio.sleep(end - time.monotonic())
            self.busy_slot_s += dt * max(running, len(scheduler.running) + len(finished))
            for seq in finished:
                self._contexts[0] += 1
                self._contexts[1] += seq.prompt + seq.output // 2
                if not seq.ticket.done():
                    seq.ticket.set_result(None)

    def _answer(
        self, path: str, body: dict[str, Any], rng: random.Random, out_tokens: int
    ) -> tuple[dict[str, Any], int, str]:
        tools = body.get("tools") or []
        if tools and path.endswith("/chat/completions") and rng.random() < self.spec.tool_call_rate:
            fn = rng.choice(tools)["function"]
            parameters = fn.get("parameters") or {"type": "object"}
            args = fake_value(parameters, rng, parameters)
            call = {
                "id": f"call_{rng.getrandbits(32):08x}",
                "type": "function",
                "function": {"name": fn["name"], "arguments": json.dumps(args)},
            }
            return {"role": "assistant", "content": None, "tool_calls": [call]}, out_tokens, "tool_calls"
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            text = json.dumps(fake_value(fmt["json_schema"].get("schema", {}), rng))
            return {"role": "assistant", "content": text}, max(out_tokens, count_tokens(text)), "stop"
        if fmt.get("type") == "json_object":
            return {"role": "assistant", "content": "{}"}, out_tokens, "stop"
        markers = end_markers(body)
        if markers and rng.random() < self.spec.end_marker_rate:
            return {"role": "assistant", "content": markers[0]}, out_tokens, "stop"
        text = " ".join(rng.choice(_WORDS) for _ in range(out_tokens))
        finish = "length" if out_tokens >= int(body.get("max_tokens") or 1 << 30) else "stop"
        return {"role": "assistant", "content": text}, out_tokens, finish


def end_markers(body: dict[str, Any]) -> list[str]:
    """`###STOP###`-style markers the system prompt tells the model to end a dialogue with, in order."""
    system = " ".join(
        m["content"]
        for m in body.get("messages", [])
        if m.get("role") == "system" and isinstance(m.get("content"), str)
    )
    return _END_MARKER.findall(system)


def fake_value(schema: dict[str, Any], rng: random.Random, root: dict[str, Any] | None = None) -> Any:
    """A value valid for a JSON schema: objects, arrays, enums, consts, numbers, strings, booleans, null,
    `anyOf`/`oneOf` (one branch) and `$ref` into the `root` schema's `$defs` (pydantic's tool schemas).

    An object gets its required properties and, when it lists them, each optional one half the time
    (all of them when it has no `required`). `x-sim-true-rate` on a boolean sets how often the
    simulator says true, so a workload can model a filter that drops most rows.
    """
    root = root or schema
    if "$ref" in schema:
        return fake_value(_resolve(schema["$ref"], root), rng, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    branches = schema.get("anyOf") or schema.get("oneOf")
    if branches:
        return fake_value(rng.choice(branches), rng, root)
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", props))
        names = [name for name in props if name in required or rng.random() < 0.5]
        return {name: fake_value(props[name], rng, root) for name in names}
    if kind == "array":
        return [fake_value(schema.get("items", {}), rng, root) for _ in range(rng.randint(1, 3))]
    if kind == "boolean":
        return rng.random() < float(schema.get("x-sim-true-rate", 0.5))
    if kind == "integer":
        return rng.randint(int(schema.get("minimum", 0)), int(schema.get("maximum", 10)))
    if kind == "number":
        return rng.uniform(float(schema.get("minimum", 0.0)), float(schema.get("maximum", 1.0)))
    if kind == "null":
        return None
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    """A local `#/a/b` reference within the root schema."""
    if not ref.startswith("#/"):
        raise ValueError(f"simulator: only local $ref are supported, not {ref!r}")
    node: Any = root
    for key in ref[2:].split("/"):
        node = node[key]
    return node


def _error(status: int, message: str, kind: str) -> SimReply:
    return SimReply(status, {"error": {"code": status, "message": message, "type": kind}})
