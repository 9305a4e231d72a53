"""The one place `matrix dedup` touches the commit protocol: today's `OutputStore` and `Lease`.

Writing follows `matrix run`'s exactly-once rules (README, "Exactly once"): a run takes the output
with a lease; each input unit's kept rows go to Parquet parts written in one piece, then the unit's
commit record names them, created conditionally (the first commit of a unit wins, a losing attempt
removes its parts), after a check that no later run took the output over; once every unit is
committed, parts no record names are removed, then `_manifest.json` and `_SUCCESS` are written.
A rerun skips committed units. Reading a committed output as input goes through its commit
records too (`committed_parts`). To move dedup to another commit protocol, change this module.
"""

from __future__ import annotations

import posixpath
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from matrix_provider.runtime.encode import to_table
from matrix_provider.runtime.lease import Lease, check_generation
from matrix_provider.runtime.sink import META_FILE, SUCCESS_FILE, OutputStore
from matrix_provider.runtime.sources import InputError, Split, open_fs


@dataclass(frozen=True)
class Target:
    """Where to write, as Ray workers rebuild it: an output URI, its fsspec options, the lease's generation."""

    uri: str
    storage_options: dict[str, Any]
    write_retries: int
    generation: int = 0

    def store(self) -> OutputStore:
        return OutputStore(self.uri, self.storage_options, self.write_retries)


@contextmanager
def claimed(target: Target, meta: dict[str, Any], overwrite: bool) -> Iterator[tuple[Target, dict[str, Any]]]:
    """Hold the output for this run: (target with the lease's generation, the meta in force)."""
    store = target.store()
    store.check_writable()
    with Lease(store, uuid.uuid4().hex[:8]) as lease:
        held = store.claim(meta, overwrite)
        yield Target(target.uri, target.storage_options, target.write_retries, lease.generation), held


def committed(target: Target) -> dict[str, dict[str, Any]]:
    """Commit records by unit id."""
    return target.store().commit_records()


class KeptWriter:
    """One attempt at one unit: its kept rows as parts of `part_rows` rows, then its commit record."""

    def __init__(self, target: Target, unit: Split, part_rows: int):
        self.target = target
        self.store = target.store()
        self.unit = unit
        self.part_rows = part_rows
        self.attempt = uuid.uuid4().hex[:8]
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
        self.store.write_part(name, table)
        self.parts.append({"name": name, "rows": table.num_rows})
        self.buffer = []

    def commit(self, counts: dict[str, Any]) -> dict[str, Any]:
        """Commit the unit with its counts; returns the record that holds (an earlier attempt's, if one won)."""
        self._flush()
        check_generation(self.store, self.target.generation)
        record = {
            "unit_id": self.unit.uid,
            "unit": self.unit.key,
            "attempt": self.attempt,
            "generation": self.target.generation,
            "committed_at": time.time(),
            **counts,
            "parts": self.parts,
        }
        held = self.store.commit_unit(record)
        if held["attempt"] != self.attempt and self.parts:
            self.store.fs.rm([self.store.path(p["name"]) for p in self.parts])
        return held


def finish(target: Target, units: list[Split], manifest: dict[str, Any]) -> dict[str, Any]:
    """Once every unit of `units` is committed: drop records of units no longer in the input, remove parts no
    record names, write `_manifest.json` and `_SUCCESS`. Returns the manifest with those counts."""
    store = target.store()
    check_generation(store, target.generation)  # raises StaleRun when another run took the output over
    records = store.commit_records()
    planned = {u.uid for u in units}
    stale = [uid for uid in records if uid not in planned]
    store.drop_commits(stale)
    manifest = {
        **manifest,
        "units_dropped": len(stale),
        "orphan_parts_removed": store.remove_orphans([records[uid] for uid in planned]),
    }
    store.finish(manifest)
    return manifest


def committed_parts(uri: str, storage_options: dict[str, Any]) -> list[tuple[str, str, int]] | None:
    """(name, path, size) of the parts a committed matrix output's records name, sorted by name;
    None when `uri` is not a matrix output. An output whose run has not finished is refused."""
    store = OutputStore(uri, storage_options)
    try:
        if not store.fs.exists(store.path(META_FILE)):
            return None
        if not store.fs.exists(store.path(SUCCESS_FILE)):
            raise InputError(
                f"input {uri!r} is a matrix output whose run has not finished (no {SUCCESS_FILE}): "
                "finish or rerun that run first"
            )
        names = sorted(part["name"] for record in store.commit_records().values() for part in record["parts"])
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
