"""The runners over one backend: peer-to-peer (ours), a central controller (one process, or sharded
over processes), Ray Data (stage by stage with a filter between stages, fused, and Ray's own
`ray.data.llm` HTTP request processor).

Each takes a workload, its corpus and the same simulator, and returns per-row results
{id: (status, latency_s, tokens, extra)} and its wall time; `extra` holds the pipeline's own
output columns, for the quality comparison. Ray Data's staged runners drop a row from the stream
where it finishes (the `filter` between stages), so they return the rows that reached the last
stage; their throughput comes from the simulator's counters like everyone's.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import pickle
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.workload import Workload
from matrix_provider.llm.client import ClientConfig, Completion, LLMClient, _parse
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
    processes: int | None = None,
    lags: list[float] | None = None,
) -> tuple[Rows, float]:
    """The central controller in `processes` fresh processes (default: one a core), rows split by a
    hash of their id and `concurrency` shared among them: 1 is the plain controller in a process of
    its own, more the sharded one."""
    processes = processes or os.cpu_count() or 1
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
    """One unrolled stage as an async Ray Data UDF: the rows of a batch run concurrently, and the
    batch leaves when its slowest row is done (the batch barrier). A `filter` before each stage
    keeps only the rows routed to it."""

    def __init__(self, role: str, workload: Workload, config: ClientConfig, sim_overrides: list[str]):
        spec = _spec(workload, sim_overrides)
        self.pipeline = load_pipeline(spec.pipeline)
        self.role = self.pipeline.roles[role](role, spec.roles[role], spec.params, LLMClient(config))

    async def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        async def one(blob: bytes) -> tuple[bytes, str]:
            msg = pickle.loads(blob)
            msg.next_role = await _step(self.role, msg)
            msg.__dict__["t_done"] = time.time()
            return pickle.dumps(msg), msg.next_role or ""

        done = await asyncio.gather(*(one(b) for b in batch["msg"]))
        return {"msg": [m for m, _ in done], "next": [n for _, n in done], "t0": batch["t0"]}


def _admitted(workload: Workload, sim_overrides: list[str], corpus: Path) -> tuple[list[dict[str, Any]], float]:
    """Every row's message after admission, pickled, with its first role: a Ray Data runner's input."""
    spec = _spec(workload, sim_overrides)
    pipeline = load_pipeline(spec.pipeline)
    t0 = time.time()
    items = []
    for row in _load(corpus):
        msg, first = _admit(pipeline, spec, row)
        msg.next_role = first
        items.append({"msg": pickle.dumps(msg), "next": first or "", "t0": t0})
    return items, t0


def _finished(workload: Workload, sim_overrides: list[str], blobs: list[bytes], t0: float) -> Rows:
    pipeline = load_pipeline(_spec(workload, sim_overrides).pipeline)
    rows = {}
    for blob in blobs:
        msg = pickle.loads(blob)
        if not msg.done:
            msg.finish("error", f"still routed to {msg.next_role!r} after the last unrolled stage")
        latency = msg.__dict__.get("t_done", time.time()) - t0
        rows[msg.id] = _result(pipeline, output_row(pipeline, msg), latency)
    return rows


def run_ray_data(
    workload: Workload,
    corpus: Path,
    config: ClientConfig,
    sim_overrides: list[str],
    concurrency: int,
    batch_size: int = 16,
) -> tuple[Rows, float]:
    """Each stage a `map_batches` over the dataset, as batch pipelines are written, tuned well:
    async UDFs with a persistent HTTP client on one actor per stage, a `filter` before each stage
    so it sees only the rows routed to it, streaming execution (no stage-wide barrier, only the
    batch's), and the `concurrency` rows in flight shared among the stages by the share of rows each
    works on (at least one batch each), as one would size them after a pilot run. A multi-turn
    workload is unrolled into its maximum number of stages.
    """
    import ray.data

    started = time.monotonic()
    items, t0 = _admitted(workload, sim_overrides, corpus)
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
    batches = concurrency / batch_size / sum(workload.traffic)
    for role, traffic in zip(workload.stages, workload.traffic, strict=True):
        ds = ds.filter(expr=f"next == '{role}'").map_batches(
            _StageUDF,
            fn_constructor_args=(role, workload, config, sim_overrides),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=max(1, round(batches * traffic))),
            num_cpus=0,
        )
    finished = [r["msg"] for r in ds.take_all()]
    return _finished(workload, sim_overrides, finished, t0), time.monotonic() - started


class _Request(Exception):
    """The request a role wants sent, raised by `_Replay` instead of sending it."""

    def __init__(self, body: dict[str, Any]):
        super().__init__("request")
        self.body = body


class _Replay(LLMClient):
    """A role's LLM client outside our runtime: with no `answer` it raises the request the role would
    send (so ray.data.llm can send it); with the HTTP response as `answer` it hands that to the role."""

    def __init__(self, config: ClientConfig, answer: dict[str, Any] | None = None):
        super().__init__(config)
        self.answer = answer

    async def _request(self, path: str, body: dict[str, Any], sticky_key: str) -> Completion:
        if self.answer is None:
            raise _Request(body)
        return _parse(self.answer, None)


def _drive(coro: Any) -> None:
    """Run a coroutine that never suspends (a role whose one await is its `_Replay` call)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("the role awaited something other than its LLM call")


class _RoleOnRows:
    """ray.data.llm's preprocess and postprocess for one role: the role's own request for a row, and
    the role run on the answer (results, usage, routing), so the work is the same as in the runtime."""

    def __init__(self, role: str, workload: Workload, config: ClientConfig, sim_overrides: list[str]):
        spec = _spec(workload, sim_overrides)
        self.name, self.spec, self.config = role, spec, config
        self.cls = load_pipeline(spec.pipeline).roles[role]

    def _role(self, answer: dict[str, Any] | None) -> Any:
        return self.cls(self.name, self.spec.roles[self.name], self.spec.params, _Replay(self.config, answer))

    def request(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            _drive(self._role(None).run(pickle.loads(row["msg"])))
        except _Request as wanted:
            return {"msg": row["msg"], "t0": row["t0"], "payload": wanted.body}
        raise RuntimeError(f"role {self.name!r} finished without asking the LLM")

    def answer(self, row: dict[str, Any]) -> dict[str, Any]:
        msg = pickle.loads(row["msg"])
        try:
            _drive(self._role(row["http_response"]).run(msg))
            nxt = None if msg.done else msg.route(self.name)
        except Exception as exc:  # the same outcome as the runtime: an error row
            msg.finish("error", f"{self.name}: {exc}")
            nxt = None
        msg.__dict__["t_done"] = time.time()
        return {"msg": pickle.dumps(msg), "next": nxt or "", "t0": row["t0"]}


def run_ray_data_llm(
    workload: Workload,
    corpus: Path,
    config: ClientConfig,
    sim_overrides: list[str],
    concurrency: int,
    batch_size: int = 16,
) -> tuple[Rows, float]:
    """Ray's own batch-inference API: a `ray.data.llm` HTTP request processor per stage against the
    same OpenAI-compatible endpoint, a `filter` before each stage, the roles' own prompts and parsing
    in its preprocess and postprocess. `concurrency` rows in flight become that many processor
    actors over the stages by their traffic (its HTTP stage sends a batch's requests one by one)."""
    import ray.data
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    started = time.monotonic()
    items, t0 = _admitted(workload, sim_overrides, corpus)
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
    url = config.endpoints[0].rstrip("/") + "/chat/completions"
    for role, traffic in zip(workload.stages, workload.traffic, strict=True):
        steps = _RoleOnRows(role, workload, config, sim_overrides)
        actors = max(1, round(concurrency * traffic / sum(workload.traffic) / batch_size))
        processor = build_processor(
            # No CPU reservations, as for every runner here: on 2 cores three stages' actors reserving a
            # CPU each could never all be placed.
            HttpRequestProcessorConfig(
                url=url, batch_size=batch_size, concurrency=actors, http_request_stage={"num_cpus": 0}
            ),
            preprocess=steps.request,
            postprocess=steps.answer,
            postprocess_map_kwargs={"num_cpus": 0},
        )
        ds = processor(ds.filter(expr=f"next == '{role}'"))
    finished = [r["msg"] for r in ds.take_all()]
    return _finished(workload, sim_overrides, finished, t0), time.monotonic() - started


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
