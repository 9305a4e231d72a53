"""Partition drivers: each owns a disjoint shard of the input and keeps `concurrency` rows in flight.

A driver admits a row the moment another finishes (no batch barrier), never relays a row between
agents, and is the only writer of its partition's output. It watches every admitted row: a row past
its deadline, or missing from every agent's `held` set in two audits running (its actor died), is
delivered again; the first result to come back is committed and later ones are dropped. That is
at-least-once delivery into an idempotent sink, so each input row is written exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from matrix_provider.runtime import names
from matrix_provider.runtime.agents import PeerDirectory, hand_off
from matrix_provider.runtime.metrics import PipelineMetrics
from matrix_provider.runtime.orchestrator import ERROR
from matrix_provider.runtime.pipeline import error_row, load_pipeline, output_row
from matrix_provider.runtime.sink import OutputStore
from matrix_provider.runtime.sources import Record, Split, open_fs, read_split
from matrix_provider.runtime.spec import PipelineSpec

_READ_BATCH = 256
_AUDIT_MISSES = 2


@dataclass
class Flight:
    row: dict[str, Any]
    delivery: int
    deadline: float
    acked: bool = False
    misses: int = 0
    admitted: float = 0.0


@dataclass
class Counters:
    rows_in: int = 0
    rows_ok: int = 0
    rows_filtered: int = 0
    rows_error: int = 0
    rows_resumed: int = 0
    rows_redelivered: int = 0
    results_dropped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    parts: int = 0


def _take(iterator: Any, n: int) -> list[Record]:
    return list(itertools.islice(iterator, n))


@ray.remote(max_restarts=0)
class PartitionDriver:
    def __init__(self, run_id: str, partition: int, spec_json: str, splits: list[Split], run_token: str):
        self.spec = PipelineSpec.model_validate_json(spec_json)
        self.pipeline = load_pipeline(self.spec.pipeline)
        self.partition = partition
        self.splits = splits
        self.run_token = run_token
        self.peers = PeerDirectory(run_id, {r: s.replicas for r, s in self.spec.roles.items()})
        self.ledger = ray.get_actor(names.ledger_name(run_id), namespace=names.NAMESPACE)
        self.store = OutputStore(self.spec.run.output, self.spec.io.storage_options)
        self.metrics = PipelineMetrics(self.pipeline.name)
        self.in_flight: dict[str, Flight] = {}
        self.buffer: list[dict[str, Any]] = []
        self.counters = Counters()
        self.seq = itertools.count()
        self.flush_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()
        self.reading = True
        self.slots: asyncio.Semaphore | None = None
        self.idle: asyncio.Event | None = None
        self.started = time.monotonic()

    # -- admission -------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        self.slots = asyncio.Semaphore(self.spec.run.concurrency)
        self.idle = asyncio.Event()
        watchdog = asyncio.create_task(self._watchdog())
        flusher = asyncio.create_task(self._flusher())
        try:
            fs, _ = open_fs(self.spec.run.input, self.spec.io.storage_options)
            for split in self.splits:
                records = read_split(fs, split, self.spec.io)
                while batch := await asyncio.to_thread(_take, records, _READ_BATCH):
                    await self._admit_batch(batch)
            self.reading = False
            if not self.in_flight:
                self.idle.set()
            await self.idle.wait()
            await self._flush()
        finally:
            watchdog.cancel()
            flusher.cancel()
        return self.stats()

    async def _admit_batch(self, batch: list[Record]) -> None:
        claims = await self.ledger.claim.remote([(r.id, r.pos_id) for r in batch])
        for record, claim in zip(batch, claims, strict=True):
            self.counters.rows_in += 1
            if claim in ("resumed", "duplicate_resumed"):
                self.counters.rows_resumed += 1
            elif claim == "duplicate":
                reason = f"duplicate id {record.id!r}: an earlier row has it; kept under its position id"
                await self._emit(error_row(self.pipeline, record.pos_id, ERROR, reason))
            elif record.row is None:
                await self._emit(error_row(self.pipeline, record.id, record.status or ERROR, record.reason or ""))
            else:
                assert self.slots is not None
                await self.slots.acquire()
                self.in_flight[record.id] = Flight(record.row, 0, 0.0, admitted=time.monotonic())
                self._spawn(self._deliver(record.id))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, row_id: str) -> None:
        """(Re)deliver a row to the first role its orchestrator names."""
        flight = self.in_flight.get(row_id)
        if flight is None:
            return
        flight.delivery += 1
        flight.deadline = time.monotonic() + self.spec.orchestrator.row_deadline_s
        flight.acked, flight.misses = False, 0
        msg = self.pipeline.orchestrator(
            id=row_id,
            partition=self.partition,
            delivery=flight.delivery,
            deadline=flight.deadline,
            row=flight.row,
        )
        first = msg.route(None)
        if first is None:
            await self.complete(output_row(self.pipeline, msg), flight.delivery)
            return
        msg.next_role = first
        msg.offload(self.spec.orchestrator.offload_bytes)
        delivery = flight.delivery
        try:
            await hand_off(self.peers, first, msg)
        except RuntimeError as exc:
            await self._fail_or_redeliver(row_id, str(exc))
            return
        if (current := self.in_flight.get(row_id)) is not None and current.delivery == delivery:
            current.acked = True

    # -- results ---------------------------------------------------------------------------------
    async def complete_many(self, results: list[tuple[dict[str, Any], int]]) -> None:
        """Finished rows from an agent, each with the delivery it came from."""
        for row, delivery in results:
            await self.complete(row, delivery)

    async def complete(self, row: dict[str, Any], delivery: int) -> None:
        """A finished row from an agent: commit the first result of each id, drop later ones."""
        flight = self.in_flight.pop(row["id"], None)
        if flight is None:
            self.counters.results_dropped += 1
            return
        assert self.slots is not None
        self.slots.release()
        row["latency_s"] = round(time.monotonic() - flight.admitted, 4)
        await self._emit(row)

    async def _emit(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        self._count(row)
        if len(self.buffer) >= self.spec.io.part_rows:
            await self._flush()
        if not self.reading and not self.in_flight and self.idle is not None:
            self.idle.set()

    async def _flush(self) -> None:
        async with self.flush_lock:
            rows, self.buffer = self.buffer, []
            if not rows:
                return
            table = pa.Table.from_pylist(rows, schema=self.pipeline.schema)
            name = f"part-{self.partition:04d}-{self.run_token}-{next(self.seq):05d}.parquet"
            await asyncio.to_thread(self.store.write_part, name, table)
            self.counters.parts += 1

    def _count(self, row: dict[str, Any]) -> None:
        c = self.counters
        status = row["status"]
        if status == "ok":
            c.rows_ok += 1
        elif status == "filtered":
            c.rows_filtered += 1
        else:
            c.rows_error += 1
        prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
        c.prompt_tokens += prompt
        c.completion_tokens += completion
        self.metrics.rows.inc(1, {"status": status})
        if prompt:
            self.metrics.prompt_tokens.inc(prompt)
        if completion:
            self.metrics.completion_tokens.inc(completion)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.spec.io.flush_interval_s)
            await self._flush()

    # -- watching --------------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.spec.orchestrator.audit_interval_s)
            self.metrics.in_flight.set(len(self.in_flight), {"partition": str(self.partition)})
            now = time.monotonic()
            for row_id, flight in list(self.in_flight.items()):
                if flight.acked and now > flight.deadline:
                    await self._fail_or_redeliver(
                        row_id, f"no result within row_deadline_s={self.spec.orchestrator.row_deadline_s:g}s"
                    )
            await self._audit()

    async def _audit(self) -> None:
        held: set[tuple[str, int]] = set()
        timeout = max(self.spec.orchestrator.audit_interval_s * 5, 10.0)

        async def ask(agent: Any) -> None:
            try:
                rows = await asyncio.wait_for(agent.held_rows.remote(self.partition), timeout)
            except Exception:  # dead or restarting: it holds nothing we can count on
                return
            held.update(rows)

        await asyncio.gather(*(ask(a) for a in self.peers.all_agents()))
        for row_id, flight in list(self.in_flight.items()):
            if not flight.acked:
                continue
            if (row_id, flight.delivery) in held:
                flight.misses = 0
                continue
            flight.misses += 1
            if flight.misses >= _AUDIT_MISSES:
                await self._fail_or_redeliver(row_id, "row lost with an agent")

    async def _fail_or_redeliver(self, row_id: str, reason: str) -> None:
        flight = self.in_flight.get(row_id)
        if flight is None:
            return
        if flight.delivery >= self.spec.orchestrator.max_deliveries:
            row = error_row(
                self.pipeline, row_id, ERROR, f"{reason}; gave up after {flight.delivery} deliveries", flight.delivery
            )
            await self.complete(row, flight.delivery)
            return
        self.counters.rows_redelivered += 1
        self.metrics.redelivered.inc()
        flight.acked = False
        self._spawn(self._deliver(row_id))

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "partition": self.partition,
            "rows_in": c.rows_in,
            "rows_ok": c.rows_ok,
            "rows_filtered": c.rows_filtered,
            "rows_error": c.rows_error,
            "rows_resumed": c.rows_resumed,
            "rows_redelivered": c.rows_redelivered,
            "results_dropped": c.results_dropped,
            "rows_buffered": len(self.buffer),
            "in_flight": len(self.in_flight),
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "parts": c.parts,
            "reading": self.reading,
        }
