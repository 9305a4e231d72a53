"""What `matrix dedup` reads: the input's units and their records, with ids that never depend on
how many partitions a run uses.

A folder of JSONL/Parquet is cut into units as `matrix run` cuts it (`runtime/sources.py`: files,
byte ranges of big JSONL files, row-group ranges of big Parquet files), at a unit size fixed when
the output is first written. A committed matrix output (it has `_epochs/`) is read only through
its commit records, and only its `ok` rows count as documents. A record's node id is its unit's
index in the plan and its position in the unit: `unit << 32 | ordinal`, so the smallest node id of a
cluster is its first document in input order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from matrix_provider.dedup import output
from matrix_provider.runtime.records import Record, Split, check_row
from matrix_provider.runtime.sources import InputError, list_inputs, open_fs, plan_units, read_unit
from matrix_provider.runtime.spec import IOSpec

ORDINAL_BITS = 32
MAX_UNITS = 1 << 31


@dataclass(frozen=True)
class Plan:
    """The input's units in a fixed order, and whether it is a matrix output (with a status column)."""

    uri: str
    units: tuple[Split, ...]
    matrix_output: bool

    def node(self, unit: int, ordinal: int) -> int:
        return unit << ORDINAL_BITS | ordinal


def plan(uri: str, io: IOSpec, split_bytes: int) -> Plan:
    """The units of `uri`; raises InputError naming what is wrong (missing, empty, unfinished)."""
    parts = output.committed_parts(uri, io.storage_options)
    if parts is not None:
        fs, _ = open_fs(uri, io.storage_options)
        files = [Split(path=path, name=name, kind="parquet", size=size) for name, path, size in parts]
        units = plan_units(fs, files, split_bytes)
    else:
        fs, files = list_inputs(uri, io)
        units = plan_units(fs, files, split_bytes)
    if len(units) >= MAX_UNITS:
        raise InputError(f"input {uri!r} has {len(units)} units; raise io.split_bytes")
    return Plan(uri, tuple(units), parts is not None)


@dataclass
class Document:
    """One record of a unit: its ordinal there, and its row when it is a document to dedup."""

    ordinal: int
    record: Record
    row: dict[str, Any] | None
    reason: str | None = None  # why it is not a document: bad input, or a matrix output's non-ok row
    skipped: bool = False  # the latter


def documents(plan: Plan, unit: int, io: IOSpec) -> Iterator[Document]:
    """The unit's records in order. Bad input (no text, text not a string, a bad line) and a matrix
    output's rows whose status is not `ok` come with the reason they are not deduplicated."""
    fs, _ = open_fs(plan.uri, io.storage_options)
    split = plan.units[unit]
    records = _committed_records(fs, split, io) if plan.matrix_output else ((r, None) for r in read_unit(fs, split, io))
    for ordinal, (record, skipped) in enumerate(records):
        if ordinal >= 1 << ORDINAL_BITS:
            raise InputError(f"unit {split.key} has over 2^32 rows; lower io.split_bytes")
        if skipped:
            yield Document(ordinal, record, None, skipped, skipped=True)
        else:
            yield Document(ordinal, record, record.row, None if record.row is not None else record.reason)


def _committed_records(fs: Any, split: Split, io: IOSpec) -> Iterator[tuple[Record, str | None]]:
    """A committed part's rows: those whose status is not `ok` are skipped with it, the others are
    checked as `matrix run` checks its input rows (text present and a string)."""
    with fs.open(split.path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        groups = list(range(split.start, split.end if split.end is not None else parquet.num_row_groups))
        index = sum(parquet.metadata.row_group(i).num_rows for i in range(split.start))
        for batch in parquet.iter_batches(row_groups=groups, batch_size=1024):
            for row in batch.to_pylist():
                pos_id = f"{split.name}#{index}"
                index += 1
                status = row.get("status", "ok")
                if status != "ok":
                    yield Record(pos_id, str(row.get(io.id_field) or pos_id), None), f"status {status!r} in the input"
                else:
                    yield check_row(row, pos_id, io), None
