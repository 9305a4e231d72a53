"""The one place `matrix dedup` touches the commit protocol: the same one `matrix run` uses (sink.py,
lease.py), so a dedup output is exactly once under the same faults.

A run takes the output with the lease (`take_output`: its content epoch opened or resumed); each
input unit's kept rows go to staged Parquet parts, then the unit's commit record names them,
created conditionally (the first commit of a unit wins; a losing attempt unstages its parts), then
the parts are published. Every write checks the fence first, so a run that was taken over writes
nothing more. Once every unit is committed the output is completed as `matrix run` completes one
(`OutputStore.complete`: repair, sweep, check) and `_manifest.json` and `_SUCCESS` are written. A
rerun skips committed units. Reading a committed output as input goes through its commit records
too (`committed_parts`).
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from matrix_provider.runtime.encode import to_table
from matrix_provider.runtime.lease import DEFAULT_TTL_S, check_generation, take_output
from matrix_provider.runtime.records import Split
from matrix_provider.runtime.sink import EPOCHS_DIR, MANIFEST_FILE, SUCCESS_FILE, OutputStore
from matrix_provider.runtime.sources import InputError, open_fs


@dataclass(frozen=True)
class Target:
    """Where to write, as Ray workers rebuild it: the output, its fsspec options, the lease's
    generation (the fence) and the content epoch the run writes."""

    uri: str
    storage_options: dict[str, Any]
    write_retries: int
    generation: int = 0
    epoch: int = 0
    ttl_s: float = DEFAULT_TTL_S

    def store(self) -> OutputStore:
        return OutputStore(self.uri, self.storage_options, self.write_retries)

    def fence(self, store: OutputStore) -> Any:
        return lambda: check_generation(store, self.generation)


@contextmanager
def claimed(target: Target, meta: dict[str, Any], overwrite: bool) -> Iterator[tuple[Target, dict[str, Any]]]:
    """Hold the output for this run: (target with the lease's generation and epoch, the meta in force)."""
    store = target.store()
    store.check_writable()
    lease, held = take_output(store, uuid.uuid4().hex[:8], meta, overwrite, target.ttl_s)
    try:
        yield (
            Target(target.uri, target.storage_options, target.write_retries, lease.generation, lease.epoch),
            held,
        )
        lease.check()
    finally:
        lease.release()


def committed(target: Target) -> dict[str, dict[str, Any]]:
    """Commit records of the run's epoch, by unit id."""
    return target.store().unit_records(target.epoch)


class KeptWriter:
    """One attempt at one unit: its kept rows as staged parts of `part_rows` rows, then its record."""

    def __init__(self, target: Target, unit: Split, part_rows: int):
        self.target = target
        self.store = target.store()
        self.fence = target.fence(self.store)
        self.unit = unit
        self.part_rows = part_rows
        self.attempt = f"g{target.generation:08d}-{uuid.uuid4().hex[:12]}"
        self.buffer: list[dict[str, Any]] = []
        self.parts: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.part_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        table = to_table(self.buffer, _schema_of(self.buffer))
        name = f"part-{self.unit.uid}-{self.attempt}-{len(self.parts):05d}.parquet"
        self.store.stage_part(self.target.epoch, name, table, self.fence)
        self.parts.append({"name": name, "rows": table.num_rows})
        self.buffer = []

    def commit(self, counts: dict[str, Any]) -> dict[str, Any]:
        """Commit the unit with its counts and publish its parts; returns the record that holds
        (an earlier attempt's, if one won)."""
        self._flush()
        record = {
            "unit_id": self.unit.uid,
            "unit": self.unit.key,
            "identity": self.unit.identity,
            "attempt": self.attempt,
            "generation": self.target.generation,
            "epoch": self.target.epoch,
            "committed_at": time.time(),
            **counts,
            "parts": self.parts,
        }
        held = self.store.create_unit_record(self.target.epoch, record, self.fence)
        if held["attempt"] != self.attempt:
            named = {p["name"] for p in held["parts"]}
            self.store.unstage(
                self.target.epoch, self.unit.uid, [p["name"] for p in self.parts if p["name"] not in named]
            )
        self.store.publish(self.target.epoch, held, self.fence)
        return held


def finish(target: Target, units: list[Split], manifest: dict[str, Any]) -> dict[str, Any]:
    """Once every unit of `units` is committed: complete the output (records of units no longer in the
    input and parts no record names swept), write `_manifest.json` and `_SUCCESS`. Returns the manifest."""
    store = target.store()
    fence = target.fence(store)
    records = store.unit_records(target.epoch)
    planned = {u.uid: records[u.uid] for u in units}
    manifest = {
        **manifest,
        "units_dropped": len(records) - len(planned),
        "orphans_removed": store.complete(target.epoch, planned, fence),
        "epoch": target.epoch,
        "generation": target.generation,
    }
    store.finish(manifest, fence)
    return manifest


def committed_parts(uri: str, storage_options: dict[str, Any]) -> list[tuple[str, str, int]] | None:
    """(name, path, size) of the parts a finished matrix output's records name (its manifest's epoch),
    sorted by name; None when `uri` is not a matrix output. An unfinished one is refused."""
    store = OutputStore(uri, storage_options)
    try:
        if not store.fs.exists(store.path(EPOCHS_DIR)):
            return None
        if not store.fs.exists(store.path(SUCCESS_FILE)):
            raise InputError(
                f"input {uri!r} is a matrix output whose run has not finished (no {SUCCESS_FILE}): "
                "finish or rerun that run first"
            )
        epoch = json.loads(store.fs.cat_file(store.path(MANIFEST_FILE)))["epoch"]
        records = store.unit_records(int(epoch))
        names = sorted(part["name"] for record in records.values() for part in record["parts"])
    except InputError:
        raise
    except Exception as exc:  # fsspec backends raise many unrelated types for one cause
        raise InputError(f"cannot read input {uri!r}: {type(exc).__name__}: {exc}") from None
    fs, root = open_fs(uri, storage_options)
    return [(name, posixpath.join(root, name), int(fs.size(posixpath.join(root, name)) or 0)) for name in names]


def _schema_of(rows: list[dict[str, Any]]) -> pa.Schema:
    """The columns of `rows` in order of first appearance, each typed as Arrow infers it; a column
    whose values fit no one type is a string column (`to_table` stores their JSON text)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    fields = []
    for name in names:
        try:
            type_ = pa.array([row.get(name) for row in rows]).type
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            type_ = pa.string()
        fields.append(pa.field(name, type_))
    return pa.schema(fields)
