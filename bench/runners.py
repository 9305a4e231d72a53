"""The three runners over one backend: peer-to-peer (ours), Ray Data batches, a central controller.

Each returns per-row results {id: (status, latency_s, tokens)} and its wall time.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from matrix_provider.llm.client import ClientConfig, LLMClient
from matrix_provider.runtime import job
from matrix_provider.runtime.pipeline import load_pipeline
from matrix_provider.runtime.roles import RowError
from matrix_provider.runtime.spec import compose

PIPELINE = load_pipeline("natural_reasoning")
Rows = dict[str, tuple[str, float, int]]


def _load(corpus: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in corpus.read_text().splitlines()]


def run_p2p(corpus: Path, out: Path, sim_overrides: list[str], partitions: int, concurrency: int) -> tuple[Rows, float]:
    spec = compose(
        "natural_reasoning",
        [
            *sim_overrides,
            "roles.filter.replicas=2",
            "roles.score.replicas=2",
            "roles.question.replicas=2",
            "roles.filter.max_concurrency=4096",
            "roles.score.max_concurrency=4096",
            "roles.question.max_concurrency=4096",
            "io.part_rows=5000",
        ],
        {
            "input": str(corpus),
            "output": str(out),
            "partitions": partitions,
            "concurrency": concurrency,
            "overwrite": True,
        },
    )
    started = time.monotonic()
    job.run(spec, quiet=True)
    wall = time.monotonic() - started
    table = pq.read_table(out, columns=["id", "status", "latency_s", "prompt_tokens", "completion_tokens"])
    rows = {
        r["id"]: (r["status"], r["latency_s"] or 0.0, r["prompt_tokens"] + r["completion_tokens"])
        for r in table.to_pylist()
    }
    return rows, wall


async def _drive_row(row: dict[str, Any], roles: dict[str, Any], started: float) -> tuple[str, float, int]:
    msg = PIPELINE.orchestrator(id=row["id"], partition=0, delivery=1, deadline=0.0, row=row)
    role = msg.route(None)
    while role is not None:
        try:
            await roles[role].run(msg)
        except (RowError, Exception) as exc:  # same outcome as the runtime: an error row
            msg.finish("error", str(exc))
            break
        role = msg.route(role)
    return msg.status or "error", time.monotonic() - started, sum(msg.usage.values())


def _roles(client: LLMClient, spec: Any) -> dict[str, Any]:
    return {name: cls(name, spec.roles[name], spec.params, client) for name, cls in PIPELINE.roles.items()}


def run_central(corpus: Path, config: ClientConfig, sim_overrides: list[str], concurrency: int) -> tuple[Rows, float]:
    """One asyncio process drives every row through every step, a semaphore bounding rows in flight."""
    spec = compose("natural_reasoning", sim_overrides, {"input": "-", "output": "-"})
    rows = _load(corpus)

    async def main() -> Rows:
        client = LLMClient(config)
        roles = _roles(client, spec)
        gate = asyncio.Semaphore(concurrency)

        async def one(row: dict[str, Any]) -> tuple[str, tuple[str, float, int]]:
            async with gate:
                return row["id"], await _drive_row(row, roles, time.monotonic())

        results = dict(await asyncio.gather(*(one(r) for r in rows)))
        await client.aclose()
        return results

    started = time.monotonic()
    results = asyncio.run(main())
    return results, time.monotonic() - started


class _StepUDF:
    """One pipeline step as a Ray Data batch UDF: all rows of a batch run concurrently, the batch
    returns when its slowest row is done (the batch barrier)."""

    def __init__(self, role: str, config: ClientConfig, sim_overrides: list[str]):
        self.role_name = role
        self.config = config
        self.spec = compose("natural_reasoning", sim_overrides, {"input": "-", "output": "-"})
        self.loop = asyncio.new_event_loop()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.loop.run_until_complete(self._run(batch))

    async def _run(self, batch: dict[str, Any]) -> dict[str, Any]:
        client = LLMClient(self.config)
        role = PIPELINE.roles[self.role_name](self.role_name, self.spec.roles[self.role_name], self.spec.params, client)
        states = [json.loads(s) for s in batch["state"]]

        async def step(state: dict[str, Any]) -> dict[str, Any]:
            if state.get("next", "filter") != self.role_name:
                return state  # finished earlier: passes through
            msg = PIPELINE.orchestrator(
                id=state["id"], partition=0, delivery=1, deadline=0.0, row=state["row"], results=state["results"]
            )
            msg.usage = state["usage"]
            try:
                await role.run(msg)
                nxt = msg.route(self.role_name)
            except Exception as exc:  # an error row, as in the other runners
                msg.finish("error", str(exc))
                nxt = None
            return {
                **state,
                "results": msg.results,
                "usage": msg.usage,
                "next": nxt or "",
                "status": msg.status or "",
                "t_done": time.time(),
            }

        out = await asyncio.gather(*(step(s) for s in states))
        await client.aclose()
        return {"state": [json.dumps(s) for s in out]}


def run_ray_data(
    corpus: Path, config: ClientConfig, sim_overrides: list[str], concurrency: int, batch_size: int = 64
) -> tuple[Rows, float]:
    """Each step a map_batches over the dataset (an actor pool of `concurrency / batch_size` actors).

    Ray Data streams batches from step to step, so the only barrier is the batch: a batch moves
    on when its slowest row is done. That is the fair, well-tuned shape of a batch pipeline.
    """
    import ray.data

    started = time.monotonic()
    t0 = time.time()
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    items = [
        {"state": json.dumps({"id": r["id"], "row": r, "results": {}, "usage": usage, "t0": t0, "next": "filter"})}
        for r in _load(corpus)
    ]
    actors = max(1, concurrency // batch_size)
    ds = ray.data.from_items(items)
    for role in ("filter", "score", "question"):
        ds = ds.map_batches(
            _StepUDF,
            fn_constructor_args=(role, config, sim_overrides),
            batch_size=batch_size,
            concurrency=actors,
            num_cpus=0,
        )
    finished = [json.loads(r["state"]) for r in ds.take_all()]
    wall = time.monotonic() - started
    rows = {s["id"]: (s["status"], s["t_done"] - s["t0"], sum(s["usage"].values())) for s in finished}
    return rows, wall
