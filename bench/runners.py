"""The three runners over one backend: peer-to-peer (ours), Ray Data batches, a central controller.

Each takes a workload, its corpus and the same simulator, and returns per-row results
{id: (status, latency_s, tokens, extra)} and its wall time; `extra` holds the pipeline's own
output columns, for the quality comparison.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import pickle
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.workload import Workload
from matrix_provider.llm.client import ClientConfig, LLMClient
from matrix_provider.runtime import job
from matrix_provider.runtime.orchestrator import Orchestrator
from matrix_provider.runtime.pipeline import Pipeline, admission, load_pipeline, output_row
from matrix_provider.runtime.spec import PipelineSpec, compose
from matrix_provider.sandbox.client import SandboxClient
from matrix_provider.sandbox.pool import SandboxPool

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


def _roles(
    pipeline: Pipeline, spec: PipelineSpec, client: LLMClient, sandbox: SandboxClient | None = None
) -> dict[str, Any]:
    return {name: cls(name, spec.roles[name], spec.params, client, sandbox) for name, cls in pipeline.roles.items()}


def _admit(pipeline: Pipeline, spec: PipelineSpec, row: dict[str, Any]) -> tuple[Orchestrator, str | None]:
    """A row's message and its first role, after the pipeline's admission check, as a partition
    driver does it (a row the check stops is finished and has no first role)."""
    msg = pipeline.orchestrator(id=row["id"], partition=0, delivery=1, deadline=0.0, row=row)
    stopped = admission(pipeline, row, spec.params)
    if stopped is not None:
        msg.finish(*stopped)
    return msg, None if msg.done else msg.route(None)


async def _converse(roles: dict[str, Any], msg: Orchestrator, role: str | None) -> None:
    """Every step of one row, from `role` on, in this event loop."""
    while role is not None:
        role = await _step(roles[role], msg)


async def _step(role: Any, msg: Orchestrator) -> str | None:
    """One role on one message, as the runtime's agents do it; returns the next role."""
    try:
        await role.run(msg)
    except Exception as exc:  # the same outcome as the runtime: an error row
        msg.finish("error", f"{role.name}: {exc}")
        return None
    return None if msg.done else msg.route(role.name)


async def _central(
    pipeline: Pipeline, spec: PipelineSpec, rows: list[dict[str, Any]], config: ClientConfig, concurrency: int
) -> tuple[Rows, list[float]]:
    """Every row through every step in this event loop, a semaphore bounding rows in flight; also
    the loop's lag (how late a 10 ms timer fires), which is what a busy controller adds to every step."""
    client = LLMClient(config)
    # Tools run in the same sandbox pool as in the runtime, in this process (one pool, pool_size workers).
    pool = SandboxPool(spec.sandbox) if pipeline.uses_sandbox else None
    sandbox = SandboxClient([pool]) if pool is not None else None
    roles = _roles(pipeline, spec, client, sandbox)
    gate = asyncio.Semaphore(concurrency)
    lags: list[float] = []

    async def watch() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)

    async def one(row: dict[str, Any]) -> tuple[str, Result]:
        async with gate:
            started = time.monotonic()
            msg, role = _admit(pipeline, spec, row)
            await _converse(roles, msg, role)
            if sandbox is not None:
                await sandbox.release(msg)
            return row["id"], _result(pipeline, output_row(pipeline, msg), time.monotonic() - started)

    watcher = asyncio.create_task(watch())
    results = dict(await asyncio.gather(*(one(r) for r in rows)))
    watcher.cancel()
    await client.aclose()
    if pool is not None:
        await pool.close()
    return results, lags


def run_central(
    workload: Workload,
    corpus: Path,
    config: ClientConfig,
    sim_overrides: list[str],
    concurrency: int,
    lags: list[float] | None = None,
) -> tuple[Rows, float]:
    """One asyncio process drives every row through every step, a semaphore bounding rows in flight
    (the way Coral's and Tau2's reference drivers are written); the loop's lags go to `lags`."""
    spec = _spec(workload, sim_overrides)
    started = time.monotonic()
    results, seen = asyncio.run(_central(load_pipeline(spec.pipeline), spec, _load(corpus), config, concurrency))
    if lags is not None:
        lags.extend(seen)
    return results, time.monotonic() - started


def _central_shard(
    workload: Workload,
    corpus: Path,
    config: ClientConfig,
    sim_overrides: list[str],
    concurrency: int,
    shard: int,
    shards: int,
) -> tuple[Rows, list[float]]:
    """One shard process: the rows whose id hashes to `shard`."""
    spec = _spec(workload, sim_overrides)
    rows = [r for r in _load(corpus) if zlib.crc32(str(r["id"]).encode()) % shards == shard]
    return asyncio.run(_central(load_pipeline(spec.pipeline), spec, rows, config, concurrency))


def run_central_processes(
    workload: Workload,
    corpus: Path,
    config: ClientConfig,
    sim_overrides: list[str],
    concurrency: int,
    processes: int,
    lags: list[float] | None = None,
) -> tuple[Rows, float]:
    """The central controller in `processes` fresh processes, rows split by a hash of their id and
    `concurrency` shared among them: 1 is the plain controller off this (sampling) process, 2 the
    sharded one."""
    started = time.monotonic()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [
            pool.submit(
                _central_shard, workload, corpus, config, sim_overrides, concurrency // processes, shard, processes
            )
            for shard in range(processes)
        ]
        results: Rows = {}
        for future in futures:
            rows, seen = future.result()
            results.update(rows)
            if lags is not None:
                lags.extend(seen)
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
        msg, first = _admit(pipeline, spec, row)
        msg.next_role = first
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


class _FusedUDF:
    """Ray Data with the stages fused: one async UDF runs each row's whole conversation, so the
    only barrier left is the batch's (its slowest conversation)."""

    def __init__(self, workload: Workload, config: ClientConfig, sim_overrides: list[str]):
        self.spec = _spec(workload, sim_overrides)
        self.pipeline = load_pipeline(self.spec.pipeline)
        self.roles = _roles(self.pipeline, self.spec, LLMClient(config))

    async def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        async def one(row: dict[str, Any]) -> bytes:
            msg, role = _admit(self.pipeline, self.spec, row)
            await _converse(self.roles, msg, role)
            msg.__dict__["t_done"] = time.time()
            return pickle.dumps(msg)

        return {"msg": list(await asyncio.gather(*(one(json.loads(r)) for r in batch["row"]))), "t0": batch["t0"]}


def run_ray_data_fused(
    workload: Workload,
    corpus: Path,
    config: ClientConfig,
    sim_overrides: list[str],
    concurrency: int,
    batch_size: int = 16,
) -> tuple[Rows, float]:
    """Ray Data as a user would write it for agents: one `map_batches` with an async UDF per row's
    whole conversation, `concurrency` rows in flight (batches in flight x batch size) on one actor."""
    import ray.data

    spec = _spec(workload, sim_overrides)
    pipeline = load_pipeline(spec.pipeline)
    started = time.monotonic()
    t0 = time.time()
    items = [{"row": json.dumps(row), "t0": t0} for row in _load(corpus)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size)).map_batches(
        _FusedUDF,
        fn_constructor_args=(workload, config, sim_overrides),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=max(1, concurrency // batch_size)),
        num_cpus=0,
    )
    finished = [pickle.loads(r["msg"]) for r in ds.take_all()]
    wall = time.monotonic() - started
    rows = {msg.id: _result(pipeline, output_row(pipeline, msg), msg.__dict__["t_done"] - t0) for msg in finished}
    return rows, wall
