"""The three runners over one backend: peer-to-peer (ours), Ray Data batches, a central controller.

Each takes a workload, its corpus and the same simulator, and returns per-row results
{id: (status, latency_s, tokens, extra)} and its wall time; `extra` holds the pipeline's own
output columns, for the quality comparison.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.workload import Workload
from matrix_provider.llm.client import ClientConfig, LLMClient
from matrix_provider.runtime import job
from matrix_provider.runtime.orchestrator import Orchestrator
from matrix_provider.runtime.pipeline import Pipeline, load_pipeline, output_row
from matrix_provider.runtime.spec import PipelineSpec, compose

Result = tuple[str, float, int, dict[str, Any]]
Rows = dict[str, Result]


def _spec(workload: Workload, sim_overrides: list[str], run: dict[str, Any] | None = None) -> PipelineSpec:
    return compose(workload.spec, sim_overrides, run or {"input": "-", "output": "-"})


def _load(corpus: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(corpus.glob("*.jsonl")) for line in path.read_text().splitlines()]


def _result(pipeline: Pipeline, row: dict[str, Any], latency: float) -> Result:
    extra = {k: row.get(k) for k in pipeline.columns.names} | {"reason": row.get("error")}
    return row["status"], latency, (row["prompt_tokens"] or 0) + (row["completion_tokens"] or 0), extra


def run_p2p(
    workload: Workload,
    corpus: Path,
    out: Path,
    sim_overrides: list[str],
    partitions: int,
    concurrency: int,
    more: tuple[str, ...] = (),
) -> tuple[Rows, float]:
    """Our runtime, in this process: `partitions` drivers with `concurrency` rows in flight each."""
    roles = _spec(workload, sim_overrides).roles
    spec = _spec(
        workload,
        [
            *sim_overrides,
            *(f"roles.{r}.max_concurrency=4096" for r in roles),
            "io.part_rows=5000",
            *more,
        ],
        {
            "input": str(corpus),
            "output": str(out),
            "partitions": partitions,
            "concurrency": concurrency,
            "overwrite": True,
        },
    )
    pipeline = load_pipeline(spec.pipeline)
    started = time.monotonic()
    job.run(spec, quiet=True)
    wall = time.monotonic() - started
    rows = {r["id"]: _result(pipeline, r, r["latency_s"] or 0.0) for r in pq.read_table(out).to_pylist()}
    return rows, wall


def _roles(pipeline: Pipeline, spec: PipelineSpec, client: LLMClient) -> dict[str, Any]:
    return {name: cls(name, spec.roles[name], spec.params, client) for name, cls in pipeline.roles.items()}


async def _step(role: Any, msg: Orchestrator) -> str | None:
    """One role on one message, as the runtime's agents do it; returns the next role."""
    try:
        await role.run(msg)
    except Exception as exc:  # the same outcome as the runtime: an error row
        msg.finish("error", f"{role.name}: {exc}")
        return None
    return None if msg.done else msg.route(role.name)


def run_central(
    workload: Workload, corpus: Path, config: ClientConfig, sim_overrides: list[str], concurrency: int
) -> tuple[Rows, float]:
    """One asyncio process drives every row through every step, a semaphore bounding rows in flight
    (the way Coral's and Tau2's reference drivers are written)."""
    spec = _spec(workload, sim_overrides)
    pipeline = load_pipeline(spec.pipeline)
    rows = _load(corpus)

    async def main() -> Rows:
        client = LLMClient(config)
        roles = _roles(pipeline, spec, client)
        gate = asyncio.Semaphore(concurrency)

        async def one(row: dict[str, Any]) -> tuple[str, Result]:
            async with gate:
                started = time.monotonic()
                msg = pipeline.orchestrator(id=row["id"], partition=0, delivery=1, deadline=0.0, row=row)
                role = msg.route(None)
                while role is not None:
                    role = await _step(roles[role], msg)
                return row["id"], _result(pipeline, output_row(pipeline, msg), time.monotonic() - started)

        results = dict(await asyncio.gather(*(one(r) for r in rows)))
        await client.aclose()
        return results

    started = time.monotonic()
    results = asyncio.run(main())
    return results, time.monotonic() - started


class _StageUDF:
    """One unrolled stage as an async Ray Data UDF: the rows of a batch whose next role is this
    stage's run concurrently, the others pass through, and the batch leaves when its slowest row
    is done (the batch barrier)."""

    def __init__(self, role: str, workload: Workload, config: ClientConfig, sim_overrides: list[str]):
        spec = _spec(workload, sim_overrides)
        self.pipeline = load_pipeline(spec.pipeline)
        self.role = self.pipeline.roles[role](role, spec.roles[role], spec.params, LLMClient(config))

    async def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        async def one(blob: bytes) -> bytes:
            msg = pickle.loads(blob)
            if msg.next_role == self.role.name:
                msg.next_role = await _step(self.role, msg)
                if msg.next_role is None:
                    msg.__dict__["t_done"] = time.time()
            return pickle.dumps(msg)

        return {"msg": list(await asyncio.gather(*(one(b) for b in batch["msg"]))), "t0": batch["t0"]}


def run_ray_data(
    workload: Workload,
    corpus: Path,
    config: ClientConfig,
    sim_overrides: list[str],
    concurrency: int,
    batch_size: int = 16,
) -> tuple[Rows, float]:
    """Each stage a `map_batches` over the dataset, as batch pipelines are written, tuned well:
    async UDFs with a persistent HTTP client on one actor per stage, streaming execution (no
    stage-wide barrier, only the batch's), and the `concurrency` rows in flight shared among the
    stages by the share of rows each works on (at least one batch each), as one would size them
    after a pilot run. A multi-turn workload is unrolled into its maximum number of stages; rows
    that finished early pass through the rest.
    """
    import ray.data

    spec = _spec(workload, sim_overrides)
    pipeline = load_pipeline(spec.pipeline)
    started = time.monotonic()
    t0 = time.time()
    items = []
    for row in _load(corpus):
        msg = pipeline.orchestrator(id=row["id"], partition=0, delivery=1, deadline=0.0, row=row)
        msg.next_role = msg.route(None)
        items.append({"msg": pickle.dumps(msg), "t0": t0})
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
    batches = concurrency / batch_size / sum(workload.traffic)
    for role, traffic in zip(workload.stages, workload.traffic, strict=True):
        per_actor = max(1, round(batches * traffic))
        ds = ds.map_batches(
            _StageUDF,
            fn_constructor_args=(role, workload, config, sim_overrides),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=per_actor),
            num_cpus=0,
        )
    finished = [pickle.loads(r["msg"]) for r in ds.take_all()]
    wall = time.monotonic() - started
    rows = {}
    for msg in finished:
        if not msg.done:
            msg.finish("error", f"still routed to {msg.next_role!r} after the last unrolled stage")
        latency = msg.__dict__.get("t_done", time.time()) - t0
        rows[msg.id] = _result(pipeline, output_row(pipeline, msg), latency)
    return rows, wall
