"""What one message costs in CPU: HTTP clients against the simulator, and Ray actor calls.

    python bench/transport.py

1. httpx vs aiohttp at 64, 256 and 1,024 requests in flight to one simulator replica: requests/s
   and client CPU per request. This is why `LLMClient` runs on aiohttp.
2. One Ray actor call per message vs one call per 32 messages, between two async actors: CPU per
   message on both sides. This is why agents and drivers coalesce their calls (`Outbox`).

Prints a table and writes bench/results/transport.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matrix_provider.llm.sim_server import deploy_sim
from matrix_provider.llm.spec import SimSpec

RESULTS = Path(__file__).resolve().parent / "results"
REQUESTS = 3000
MESSAGES = 10_000


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _httpx(url: str, body: dict[str, Any], in_flight: int) -> None:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        gate = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with gate:
                (await client.post(f"{url}/chat/completions", json={**body, "user": str(i)})).json()

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))


async def _aiohttp(url: str, body: dict[str, Any], in_flight: int) -> None:
    connector = aiohttp.TCPConnector(limit=1024)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        gate = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with gate, client.post(f"{url}/chat/completions", json={**body, "user": str(i)}) as resp:
                await resp.json()

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))


def http_clients() -> list[dict[str, Any]]:
    spec = SimSpec(
        backend="sim",
        slots=4096,
        decode_s_per_token=0.005,
        prefill_s_per_token=0.0,
        output_tokens_mean=40,
        output_tokens_sigma=0.0,
        seed=1,
    )
    url = deploy_sim(spec, "matrix-bench-transport")[0]
    body = {"model": "sim", "messages": [{"role": "user", "content": "x" * 2000}], "max_tokens": 40}
    rows = []
    for in_flight in (64, 256, 1024):
        for name, fn in (("httpx", _httpx), ("aiohttp", _aiohttp)):
            cpu, started = _cpu_s(), time.monotonic()
            asyncio.run(fn(url, body, in_flight))
            wall = time.monotonic() - started
            row = {
                "client": name,
                "in_flight": in_flight,
                "requests_per_s": round(REQUESTS / wall),
                "client_cpu_ms_per_request": round(1000 * (_cpu_s() - cpu) / REQUESTS, 2),
            }
            print(
                f"  {name:<8} {in_flight:>5} in flight: {row['requests_per_s']:>6} req/s, "
                f"{row['client_cpu_ms_per_request']:>6} ms CPU per request",
                flush=True,
            )
            rows.append(row)
    return rows


@ray.remote(num_cpus=0)
class _Sink:
    async def put_many(self, items: list[Any]) -> int:
        return len(items)

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
class _Source:
    def pid(self) -> int:
        return os.getpid()

    async def send(self, sink: Any, batch: int, payload: dict[str, Any]) -> float:
        started = time.monotonic()
        gate = asyncio.Semaphore(256)

        async def one() -> None:
            async with gate:
                await sink.put_many.remote([payload] * batch)

        await asyncio.gather(*(one() for _ in range(MESSAGES // batch)))
        return time.monotonic() - started


def actor_calls() -> list[dict[str, Any]]:
    sink, source = _Sink.remote(), _Source.remote()
    procs = [psutil.Process(ray.get(a.pid.remote())) for a in (sink, source)]
    payload = {"id": "doc-1", "row": {"text": "x" * 2000}, "results": {}, "usage": {"prompt_tokens": 1}}

    def cpu() -> float:
        return sum(p.cpu_times().user + p.cpu_times().system for p in procs)

    rows = []
    for batch in (1, 32):
        before = cpu()
        wall = ray.get(source.send.remote(sink, batch, payload))
        row = {
            "messages_per_call": batch,
            "messages_per_s": round(MESSAGES / wall),
            "cpu_ms_per_message": round(1000 * (cpu() - before) / MESSAGES, 3),
        }
        print(
            f"  {batch:>3} message(s) a call: {row['messages_per_s']:>7} msg/s, "
            f"{row['cpu_ms_per_message']} ms CPU per message (both sides)",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    print("HTTP clients against one simulator replica:")
    clients = http_clients()
    print("Ray actor calls between two async actors:")
    calls = actor_calls()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transport.json").write_text(
        json.dumps({"http_clients": clients, "actor_calls": calls}, indent=2) + "\n"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
