"""Load-simulator replicas: detached Ray actors, each serving the OpenAI API with aiohttp on 127.0.0.1.

The simulator talks plain HTTP straight to the client (no Serve proxy hop), so that what a benchmark
measures is the runtime and the modelled engine, not a proxy: on 2 cores the Serve HTTP proxy
tops out near 40 requests/s, below what the simulator is meant to model. Replicas are named by a
hash of their settings and reused by later runs with the same settings. They bind 127.0.0.1, so
the simulator is node-local: for benchmarks and fault injection, not production.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import ray
from aiohttp import web
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from matrix_provider.llm.client import ATTEMPT_HEADER, REPLICA_HEADER
from matrix_provider.llm.sim import HANG_S, SimEngine
from matrix_provider.llm.spec import SimSpec
from matrix_provider.names import NAMESPACE


@ray.remote(num_cpus=0, max_restarts=-1)
class SimReplica:
    def __init__(self, spec: dict[str, Any], name: str):
        self.engine = SimEngine(SimSpec.model_validate(spec))
        self.name = name
        self.port: int | None = None
        self.runner: web.AppRunner | None = None
        # Two jobs sharing this detached replica may call start() at once: the second must wait
        # for the first's server, not return before its port is known.
        self._starting = asyncio.Lock()

    async def start(self) -> str:
        """Start the HTTP server once; return its base URL."""
        async with self._starting:
            if self.runner is None:
                await self._serve()
        return f"http://127.0.0.1:{self.port}/v1"

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_get("/v1/stats", self._stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.runner = runner

    async def stats(self) -> dict[str, float]:
        return self.engine.stats()

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.stats())

    async def _generate(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": {"message": "request body is not JSON"}}, status=400)
        attempt = int(request.headers.get(ATTEMPT_HEADER, "1"))
        reply = await self.engine.handle(request.path, body, attempt)
        if reply.hang:
            await asyncio.sleep(HANG_S)
        return web.json_response(reply.body, status=reply.status, headers={REPLICA_HEADER: self.name})


def deploy_sim(spec: SimSpec, name: str) -> tuple[str, ...]:
    """Get or start `spec.replicas` simulator replicas named after `name`; return their URLs."""
    replicas = []
    payload = spec.model_dump(mode="json")
    for i in range(spec.replicas):
        actor_name = f"{name}-{i}"
        replicas.append(
            SimReplica.options(
                name=actor_name,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_concurrency=100_000,
                # Beside the job that deployed it (soft): a simulator's port is not handed on if it
                # restarts on another node, so keep it off the nodes a fault test may take away.
                scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
            ).remote(payload, actor_name)
        )
    return tuple(ray.get([r.start.remote() for r in replicas]))


def sim_stats(name: str, replicas: int) -> list[dict[str, float]]:
    """Engine figures of each replica (capacity, busy slot-time, tokens) for benchmarks."""
    handles = [ray.get_actor(f"{name}-{i}", namespace=NAMESPACE) for i in range(replicas)]
    return ray.get([h.stats.remote() for h in handles])
