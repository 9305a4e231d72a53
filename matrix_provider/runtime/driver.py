"""Partition drivers: each runs the work units the job hands it, keeping `concurrency` rows in flight.

A driver reads a unit, admits each row as soon as a credit is free (no batch barrier: the next
unit is read while the last rows of the previous one are still out), never relays a row between
agents, and writes the unit's rows as Parquet parts into staging, each with a part record naming
the rows (by index in the unit) it holds. When every row of a unit has come back and its parts are
written, it commits the unit (see `sink.py`), publishes the parts and returns the commit record.
An attempt at a unit that earlier attempts left open skips the rows their part records hold, so a
run killed at 90 % of a file redoes the last 10 % (plus the rows of the part being written).

State is bounded by rows in flight and open units, never by the number of rows: ids are compared
within a unit only (the first occurrence in input order keeps its id, a later one becomes an error
row under its position id), rows read but not yet written in a part are capped at the driver's
concurrency plus one part (`_wait_for_room`), and nothing of a committed unit is kept. Every write
checks the lease's fence first: a driver of a run that was taken over writes nothing more.

Every row is delivered at least once and its first result is kept, so each row is written once:
- a row past `orchestrator.row_deadline_s` is delivered again (agents drop the old delivery);
- a row an agent could not carry on is reported `lost` and delivered again at once;
- after an agent died (the job's supervisor tells us) the driver audits: rows that no live agent
  holds in two snapshots a moment apart were lost with it and are delivered again. An agent that
  does not answer makes the audit inconclusive, never a loss: a slow row is not blamed.
After `max_deliveries` deliveries a row becomes an error row.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from matrix_provider.runtime.agents import PeerDirectory, Report, hand_off
from matrix_provider.runtime.encode import to_table
from matrix_provider.runtime.lease import check_generation
from matrix_provider.runtime.metrics import PipelineMetrics
from matrix_provider.runtime.orchestrator import ERROR
from matrix_provider.runtime.pipeline import Pipeline, admission, admitted_row, error_row, load_pipeline, output_row
from matrix_provider.runtime.ranges import RangeSet
from matrix_provider.runtime.records import Record, Split
from matrix_provider.runtime.sink import OutputStore
from matrix_provider.runtime.sources import InputChanged, current_identity, open_fs, read_unit
from matrix_provider.runtime.spec import PipelineSpec
from matrix_provider.runtime.summary import add_counts, sum_counts

logger = logging.getLogger(__name__)
_READ_BATCH = 256
_FIRST_BATCH = 8  # the first rows go out after 8 admission checks, not 256: batches double from here
_AUDIT_GAP_S = 1.0
_TOP_REASONS = 20
_REASON_DETAIL = re.compile(r"\s*\([^)]*\)")  # "too short (12 words)" counts as "too short"


def reason_key(reason: str) -> str:
    return _REASON_DETAIL.sub("", reason)[:100]


@dataclass
class UnitRun:
    """One attempt at one unit: its buffer and parts until it is committed.

    `done` holds the row indexes that earlier attempts' parts (`prior`) already hold: this attempt
    reads them (their ids still count for duplicate detection) but does not run them again.
    """

    unit: Split
    attempt: str
    done: RangeSet = field(default_factory=RangeSet)
    prior: list[dict[str, Any]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    buffer: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (row index, output row)
    parts: list[dict[str, Any]] = field(default_factory=list)
    rows_read: int = 0
    redelivered: int = 0  # since the last part
    outstanding: int = 0
    reading: bool = True
    flush_now: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def drained(self) -> bool:
        return not self.reading and self.outstanding == 0


@dataclass
class Flight:
    unit: UnitRun
    index: int  # in the unit
    row_id: str
    row: dict[str, Any]
    delivery: int = 0
    deadline: float = 0.0
    acked: bool = False
    admitted: float = 0.0


def _take(
    iterator: Any, n: int, pipeline: Pipeline, params: dict[str, Any], done: RangeSet
) -> list[tuple[int, Record, Any]]:
    """The next `n` (index, record, admission verdict), the verdicts computed here, off the event
    loop, and only for rows no earlier attempt holds."""
    batch = list(itertools.islice(iterator, n))
    return [
        (i, r, None if r.row is None or r.status is not None or i in done else admission(pipeline, r.row, params))
        for i, r in batch
    ]


def _fold(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A unit's figures from its part records: counts, tokens, reasons and the summary, summed."""
    reasons: collections.Counter[str] = collections.Counter()
    for part in parts:
        reasons.update(part["reasons"])
    keys = ("rows_ok", "rows_filtered", "rows_error", "rows_redelivered", "prompt_tokens", "completion_tokens")
    return {
        **{k: sum(p[k] for p in parts) for k in keys},
        "reasons": dict(reasons.most_common(_TOP_REASONS)),
        "summary": sum_counts(p["summary"] for p in parts),
    }


@ray.remote(max_restarts=-1, max_task_retries=0)
class PartitionDriver:
    def __init__(self, run_id: str, partition: int, spec_json: str, generation: int, epoch: int):
        self.spec = PipelineSpec.model_validate_json(spec_json)
        self.pipeline = load_pipeline(self.spec.pipeline)
        self.partition = partition
        self.generation = generation
        self.epoch = epoch
        self.peers = PeerDirectory.of(run_id, self.spec)
        self.store = OutputStore(self.spec.run.output, self.spec.io.storage_options, self.spec.io.write_retries)
        self.in_fs, _ = open_fs(self.spec.run.input, self.spec.io.storage_options)
        self.metrics = PipelineMetrics(self.pipeline.name)
        self.in_flight: dict[str, Flight] = {}
        self.units: dict[str, UnitRun] = {}
        self.totals: collections.Counter[str] = collections.Counter()
        self.slots: asyncio.Semaphore | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.audit_wanted = False
        self.fatal: BaseException | None = None
        self.watchdog: asyncio.Task[None] | None = None
        self.held = 0  # rows read and not yet in a written part (in flight or buffered), every unit
        self.peak_held = 0
        self.room = asyncio.Event()
        self.room.set()

    def _fence(self) -> None:
        """Before every write: stop (StaleRun) once another run took the output over."""
        check_generation(self.store, self.generation)

    # -- units -------------------------------------------------------------------------------------
    def _ensure_started(self) -> asyncio.Semaphore:
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.spec.run.concurrency)
            self.watchdog = asyncio.get_running_loop().create_task(self._watch())
            self.watchdog.add_done_callback(self._background_done)
        return self.slots

    def _background_done(self, task: asyncio.Task[None]) -> None:
        """Supervision: a background task that dies fails every open unit at once, with its cause."""
        if not task.cancelled() and task.exception() is not None:
            self.fatal = task.exception()
            for unit in self.units.values():
                unit.wake.set()

    async def run_unit(self, unit: Split) -> dict[str, Any]:
        """Process and commit one unit; returns its commit record."""
        self._ensure_started()
        held = await asyncio.to_thread(self.store.unit_record, self.epoch, unit.uid)
        if held is not None:  # committed by an attempt that died before the job heard of it
            await asyncio.to_thread(self.store.publish, self.epoch, held, self._fence)
            return held
        await asyncio.to_thread(self._check_unchanged, unit)
        run = UnitRun(unit, f"g{self.generation:08d}-{uuid.uuid4().hex[:12]}")
        run.prior, run.done = await asyncio.to_thread(self._prior_parts, unit)
        self.totals["rows_resumed"] += len(run.done)
        self.units[run.attempt] = run
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(run))
                group.create_task(self._write(run))
            return await asyncio.to_thread(self._commit, run)
        finally:
            self.units.pop(run.attempt, None)
            self._release(sum(1 for f in self.in_flight.values() if f.unit is run) + len(run.buffer))
            for key in [k for k, f in self.in_flight.items() if f.unit is run]:
                del self.in_flight[key]
                self.slots.release()  # type: ignore[union-attr]

    def _check_unchanged(self, unit: Split) -> None:
        """Raise InputChanged when the file is no longer the version the units were planned from.
        A file that vanished is not a change: reading it gives the unit's `!unread` error row."""
        now = current_identity(self.in_fs, unit.path)
        if now is not None and now != unit.identity:
            raise InputChanged(
                f"input file {unit.name!r} changed since the run listed it (size:version {unit.identity} -> {now})"
            )

    def _prior_parts(self, unit: Split) -> tuple[list[dict[str, Any]], RangeSet]:
        """Part records of earlier attempts at this unit whose staged parts still exist, chosen so
        that no two hold the same row (attempts that ran at once may overlap), and the rows they hold."""
        staged = self.store.staged_parts(self.epoch, unit.uid)
        chosen: list[dict[str, Any]] = []
        done = RangeSet()
        for record in self.store.part_records(self.epoch, unit.uid):
            rows = RangeSet(record["ranges"])
            if record["name"] in staged and not done.intersects(rows):
                chosen.append(record)
                done = done.union(rows)
        return chosen, done

    async def _read(self, run: UnitRun) -> None:
        slots = self._ensure_started()
        records = enumerate(read_unit(self.in_fs, run.unit, self.spec.io))
        index = 0
        size = _FIRST_BATCH
        while batch := await asyncio.to_thread(_take, records, size, self.pipeline, self.spec.params, run.done):
            size = min(2 * size, _READ_BATCH)
            for position, record, verdict in batch:
                run.rows_read += 1
                if position in run.done:  # an earlier attempt's part holds it
                    run.seen.add(record.id)
                    continue
                await self._wait_for_room()
                self.held += 1
                self.peak_held = max(self.peak_held, self.held)
                if record.id in run.seen:
                    reason = (
                        f"duplicate id {record.id!r}: an earlier row of this unit has it; kept under its position id"
                    )
                    self._emit(run, position, error_row(self.pipeline, record.pos_id, ERROR, reason))
                    continue
                run.seen.add(record.id)
                if record.row is None or record.status is not None:  # decided by the reader
                    self._emit(run, position, self._decided_row(record))
                    continue
                if verdict is not None:  # stopped by the pipeline's cheap checks: never leaves this driver
                    self._emit(run, position, admitted_row(self.pipeline, record.id, record.row, *verdict))
                    continue
                await slots.acquire()
                key = f"{run.attempt}/{index}"
                index += 1
                deadline = time.time() + self.spec.orchestrator.row_deadline_s
                self.in_flight[key] = Flight(
                    run, position, record.id, record.row, deadline=deadline, admitted=time.monotonic()
                )
                run.outstanding += 1
                self._spawn(self._deliver(key))
        run.reading = False
        run.seen.clear()
        run.wake.set()

    def _decided_row(self, record: Record) -> dict[str, Any]:
        """The output row of a record its reader decided (a bad line, a WARC record that is not a
        document): the pipeline's columns filled from what the reader kept of it, where it kept any."""
        status, reason = record.status or ERROR, record.reason or ""
        if record.row is not None:
            try:
                return admitted_row(self.pipeline, record.id, record.row, status, reason)
            except Exception:  # the pipeline's output() on a partial row: the base columns still say why
                pass
        return error_row(self.pipeline, record.id, status, reason)

    async def _wait_for_room(self) -> None:
        """Hold back reading while this driver holds its concurrency plus one part of rows not yet
        written, whatever the part writes do (rows the admission check stops use no credit, so
        without this a slow part write would let a whole unit pile up in memory)."""
        while self.held >= self.spec.run.concurrency + self.spec.io.part_rows:
            self.room.clear()
            for unit in self.units.values():
                unit.flush_now = True
                unit.wake.set()
            await self.room.wait()

    def _release(self, rows: int) -> None:
        self.held -= rows
        if self.held < self.spec.run.concurrency + self.spec.io.part_rows:
            self.room.set()

    async def _write(self, run: UnitRun) -> None:
        """Write parts as rows come back: every `part_rows` rows, every `flush_interval_s`, at the end,
        and whenever the driver holds as many rows as it may."""
        io_spec = self.spec.io
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.wake.wait(), io_spec.flush_interval_s)
            run.wake.clear()
            if self.fatal is not None:
                raise RuntimeError(f"driver {self.partition}: background task failed: {self.fatal!r}")
            drained, now = run.drained, run.flush_now
            run.flush_now = False
            while len(run.buffer) >= io_spec.part_rows or (run.buffer and (drained or now)):
                await self._flush(run, min(len(run.buffer), io_spec.part_rows))
            if drained and not run.buffer:
                return

    async def _flush(self, run: UnitRun, n: int) -> None:
        """Write the first `n` buffered rows as a staged part and its record; they leave the buffer
        only once both are written."""
        chunk = run.buffer[:n]
        rows = [row for _, row in chunk]
        table = to_table(rows, self.pipeline.schema)
        name = f"part-{run.unit.uid}-{run.attempt}-{len(run.parts):05d}.parquet"
        record = self._part_record(name, [i for i, _ in chunk], table, run.redelivered)
        await asyncio.to_thread(self.store.stage_part, self.epoch, name, table, self._fence)
        await asyncio.to_thread(self.store.put_part_record, self.epoch, run.unit.uid, record, self._fence)
        del run.buffer[:n]
        run.redelivered = 0
        run.parts.append(record)
        self._release(n)

    def _part_record(self, name: str, indexes: list[int], table: pa.Table, redelivered: int) -> dict[str, Any]:
        """What a part holds: its rows by index, their counts, tokens, reasons and summary contributions,
        read back from the table as written (the encoder may have made a row that did not fit an error)."""
        summary_spec = self.pipeline.summary
        extra = list(summary_spec.columns) if summary_spec is not None else []
        rows = table.select(["status", "error", "prompt_tokens", "completion_tokens", *extra]).to_pylist()
        counts: collections.Counter[str] = collections.Counter()
        reasons: collections.Counter[str] = collections.Counter()
        summary: dict[str, Any] = {}
        for row in rows:
            status = row["status"]
            counts[{"ok": "rows_ok", "filtered": "rows_filtered"}.get(status, "rows_error")] += 1
            counts["prompt_tokens"] += row["prompt_tokens"] or 0
            counts["completion_tokens"] += row["completion_tokens"] or 0
            if status != "ok" and row.get("error"):
                reasons[reason_key(str(row["error"]))] += 1
            if summary_spec is not None:
                add_counts(summary, summary_spec.row(row))
        keys = ("rows_ok", "rows_filtered", "rows_error", "prompt_tokens", "completion_tokens")
        return {
            "name": name,
            "rows": len(rows),
            "ranges": RangeSet.of(indexes).to_json(),
            **{k: counts[k] for k in keys},
            "rows_redelivered": redelivered,
            "reasons": dict(reasons.most_common(_TOP_REASONS)),
            "summary": summary,
        }

    def _commit(self, run: UnitRun) -> dict[str, Any]:
        parts = [*run.prior, *run.parts]
        written = sum(p["rows"] for p in parts)
        if written != run.rows_read:
            raise RuntimeError(f"unit {run.unit.key}: {run.rows_read} rows read but {written} written")
        self._check_unchanged(run.unit)  # a file rewritten while it was read is not committed
        record = {
            "unit_id": run.unit.uid,
            "unit": run.unit.key,
            "identity": run.unit.identity,
            "attempt": run.attempt,
            "generation": self.generation,
            "epoch": self.epoch,
            "committed_at": time.time(),
            "rows_in": run.rows_read,
            "rows_resumed": len(run.done),
            **_fold(parts),
            "parts": [{"name": p["name"], "rows": p["rows"]} for p in parts],
        }
        held = self.store.create_unit_record(self.epoch, record, self._fence)
        if held["attempt"] != run.attempt:  # another attempt committed first: ours are orphans
            named = {p["name"] for p in held["parts"]}
            self.store.unstage(self.epoch, run.unit.uid, [p["name"] for p in run.parts if p["name"] not in named])
        else:
            self.metrics.units_committed.inc()
            if run.parts:
                self.metrics.parts_committed.inc(len(run.parts))
        self.store.publish(self.epoch, held, self._fence)
        return held

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- rows --------------------------------------------------------------------------------------
    async def _deliver(self, key: str) -> None:
        """(Re)deliver a row; any failure on the way counts as a lost delivery, never a stuck row."""
        try:
            await self._deliver_once(key)
        except Exception as exc:  # object store full, a pipeline's route() failing on odd input, ...
            self._fail_or_redeliver(key, f"delivery failed: {type(exc).__name__}: {exc}")

    async def _deliver_once(self, key: str) -> None:
        flight = self.in_flight.get(key)
        if flight is None:
            return
        flight.delivery += 1
        flight.deadline = time.time() + self.spec.orchestrator.row_deadline_s
        flight.acked = False
        msg = self.pipeline.orchestrator(
            id=flight.row_id,
            partition=self.partition,
            delivery=flight.delivery,
            deadline=flight.deadline,
            row=flight.row,
            key=key,
        )
        first = msg.route(None)
        if first is None:
            self._done(key, output_row(self.pipeline, msg))
            return
        msg.next_role = first
        msg.offload(self.spec.orchestrator.offload_bytes)
        delivery = flight.delivery
        try:
            await hand_off(self.peers, first, msg)
        except RuntimeError as exc:
            self._fail_or_redeliver(key, str(exc))
            return
        if (current := self.in_flight.get(key)) is not None and current.delivery == delivery:
            current.acked = True

    async def reports(self, items: list[Report]) -> None:
        """Finished and lost rows from agents."""
        for kind, key, delivery, payload in items:
            if kind == "done":
                self._done(key, payload)
            elif (flight := self.in_flight.get(key)) is not None and flight.delivery == delivery:
                self._fail_or_redeliver(key, payload)

    def _done(self, key: str, row: dict[str, Any]) -> None:
        """Keep the first result of a row; later ones (from superseded deliveries) are dropped."""
        flight = self.in_flight.pop(key, None)
        if flight is None:
            self.totals["results_dropped"] += 1
            return
        self.slots.release()  # type: ignore[union-attr]
        row["latency_s"] = round(time.monotonic() - flight.admitted, 4)
        run = flight.unit
        run.outstanding -= 1
        self._emit(run, flight.index, row)

    def _emit(self, run: UnitRun, index: int, row: dict[str, Any]) -> None:
        run.buffer.append((index, row))
        status = row["status"]
        column = {"ok": "rows_ok", "filtered": "rows_filtered"}.get(status, "rows_error")
        prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
        self.totals[column] += 1
        self.totals["prompt_tokens"] += prompt
        self.totals["completion_tokens"] += completion
        self.metrics.rows.inc(1, {"status": status})
        if prompt:
            self.metrics.prompt_tokens.inc(prompt)
        if completion:
            self.metrics.completion_tokens.inc(completion)
        if len(run.buffer) >= self.spec.io.part_rows or run.drained:
            run.wake.set()

    def _fail_or_redeliver(self, key: str, reason: str) -> None:
        flight = self.in_flight.get(key)
        if flight is None:
            return
        if flight.delivery >= self.spec.orchestrator.max_deliveries:
            reason = f"{reason}; gave up after {flight.delivery} deliveries"
            self._done(key, error_row(self.pipeline, flight.row_id, ERROR, reason, flight.delivery))
            return
        flight.unit.redelivered += 1
        self.totals["rows_redelivered"] += 1
        self.metrics.redelivered.inc()
        flight.acked = False
        flight.deadline = time.time() + self.spec.orchestrator.row_deadline_s
        self._spawn(self._deliver(key))

    # -- watching ----------------------------------------------------------------------------------
    async def agent_lost(self, agent_name: str) -> None:
        """The job's supervisor saw an agent die or restart: look for rows lost with it."""
        self.audit_wanted = True

    async def _watch(self) -> None:
        """Deadlines and audits; an iteration that fails is logged and the next one runs."""
        while True:
            await asyncio.sleep(min(self.spec.orchestrator.audit_interval_s, 1.0))
            try:
                await self._watch_once()
            except Exception:
                logger.exception("driver %s: watchdog iteration failed", self.partition)

    async def _watch_once(self) -> None:
        orchestrator = self.spec.orchestrator
        self.metrics.in_flight.set(len(self.in_flight), {"partition": str(self.partition)})
        now = time.time()
        for key, flight in list(self.in_flight.items()):
            if now > flight.deadline:  # acknowledged or not: a hand-off that hangs ends here too
                self._fail_or_redeliver(key, f"no result within row_deadline_s={orchestrator.row_deadline_s:g}s")
        if self.audit_wanted and self.in_flight:
            self.audit_wanted = not await self._audit()

    async def _snapshot(self) -> set[tuple[str, int]] | None:
        """Rows of this partition every agent holds; None when some agent did not answer."""
        timeout = max(self.spec.orchestrator.audit_interval_s * 5, 10.0)
        try:
            refs = [agent.held_rows.remote(self.partition) for agent in self.peers.all_agents()]
            answers = await asyncio.wait_for(asyncio.gather(*refs), timeout)
        except Exception:  # an agent restarting, or on a node being declared dead: decide later
            return None
        return {tuple(item) for answer in answers for item in answer}  # type: ignore[misc]

    async def _audit(self) -> bool:
        """Deliver again the rows held nowhere in two snapshots; False when inconclusive."""
        before = {key: f.delivery for key, f in self.in_flight.items() if f.acked}
        first = await self._snapshot()
        if first is None:
            return False
        await asyncio.sleep(_AUDIT_GAP_S)
        second = await self._snapshot()
        if second is None:
            return False
        for key, delivery in before.items():
            flight = self.in_flight.get(key)
            if flight is None or flight.delivery != delivery or not flight.acked:
                continue
            if (key, delivery) not in first and (key, delivery) not in second:
                self._fail_or_redeliver(key, "row lost with an agent")
        return True

    def stats(self) -> dict[str, Any]:
        t = self.totals
        return {
            "partition": self.partition,
            "rows_ok": t["rows_ok"],
            "rows_filtered": t["rows_filtered"],
            "rows_error": t["rows_error"],
            "rows_redelivered": t["rows_redelivered"],
            "rows_resumed": t["rows_resumed"],
            "results_dropped": t["results_dropped"],
            "in_flight": len(self.in_flight),
            "open_units": len(self.units),
            "units_reading": sum(run.reading for run in self.units.values()),
            "peak_held": self.peak_held,
            "prompt_tokens": t["prompt_tokens"],
            "completion_tokens": t["completion_tokens"],
        }
