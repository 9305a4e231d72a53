"""One `matrix dedup` run: plan the input, file every document under its keys, find the clusters,
write each unit's kept rows exactly once, report.

Stages (Ray Data; each task holds one unit or one hash partition, never the corpus):
1. keys: one task per unit reads it and writes a row (node, key, exact) per key of each document,
   plus one marker row per unit (node = its first node id + its record count), so that every unit
   is written, also one where nothing is removed, and a unit edited since it was read is caught;
2. candidate pairs by key, then connected components (graph.py);
3. removals (every node but its cluster's root; `exact` when an identical text comes earlier), the
   roots and the markers, grouped by unit: one call per unit reads the unit again, writes what is
   kept and commits it (output.py), and counts the clusters whose root it holds.
Kept is the first document of each cluster in input order, whatever the partition count.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from matrix_provider import __version__
from matrix_provider.dedup import graph, inputs, output
from matrix_provider.dedup.fingerprint import Fingerprinter
from matrix_provider.dedup.params import DedupParams
from matrix_provider.runtime.driver import reason_key
from matrix_provider.runtime.lease import StaleRun
from matrix_provider.runtime.sink import OutputError
from matrix_provider.runtime.sources import InputError, open_fs
from matrix_provider.runtime.spec import IOSpec

USAGE_ERRORS = (InputError, OutputError, ValueError)
_BATCH_ROWS = 8192
_TOP_REASONS = 10
_EXAMPLES = 10
KIND_NEAR, KIND_EXACT, KIND_UNIT, KIND_ROOT, KIND_EXACT_ROOT = range(5)
_COUNTS = ("rows_in", "rows_ok", "rows_filtered", "rows_error", "rows_skipped", "removed_exact", "removed_near")
_ORDINALS = (1 << inputs.ORDINAL_BITS) - 1
_KEYS = pa.schema(
    [("node", pa.int64()), ("hi", pa.uint64()), ("lo", pa.uint64()), ("exact", pa.bool_()), ("marker", pa.bool_())]
)


class DedupFailed(RuntimeError):
    """The run started but could not finish; a rerun resumes from the committed units."""


@dataclass(frozen=True)
class Job:
    """What the stages need, shipped to Ray tasks by value (it grows with the units, not the rows)."""

    plan: inputs.Plan
    params: DedupParams
    io: IOSpec
    target: output.Target
    committed: frozenset[str]


@dataclass(frozen=True)
class Resources:
    """How wide a run goes: hash partitions per shuffle [the cluster's CPUs], CPUs it may use [all]."""

    partitions: int | None = None
    cpus: int | None = None

    def __post_init__(self) -> None:
        for name in ("partitions", "cpus"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def run(
    input_uri: str, output_uri: str, params: DedupParams, io: IOSpec, resources: Resources, overwrite: bool
) -> dict[str, Any]:
    """Dedup `input_uri` into `output_uri`; returns the manifest. USAGE_ERRORS come before any write."""
    started = time.time()
    input_uri, output_uri = _absolute(input_uri, io), _absolute(output_uri, io)
    _check_not_inside(input_uri, output_uri, io)
    plan = inputs.plan(input_uri, io, io.split_bytes)  # fails on bad input before the output is touched
    meta = {
        "pipeline": "dedup",
        "config_hash": params.config_hash(),
        "version": __version__,
        "split_bytes": io.split_bytes,
        "spec": params.as_dict(),
    }
    target = output.Target(output_uri, io.storage_options, io.write_retries)
    try:
        with output.claimed(target, meta, overwrite) as (target, meta):
            if meta["split_bytes"] != io.split_bytes:  # a resume cuts the units the output was started with
                plan = inputs.plan(input_uri, io, meta["split_bytes"])
            records = output.committed(target)
            job = Job(plan, params, io, target, frozenset(u.uid for u in plan.units if u.uid in records))
            figures = _on_ray(job, resources)
            records = output.committed(target)
            missing = [u.key for u in plan.units if u.uid not in records]
            if missing:
                raise DedupFailed(f"{len(missing)} of {len(plan.units)} units were not committed (e.g. {missing[:3]})")
            manifest = _manifest(job, [records[u.uid] for u in plan.units], figures)
            manifest["wall_seconds"] = round(time.time() - started, 3)
            return output.finish(target, list(plan.units), manifest)
    except StaleRun as exc:  # another run took the output over: nothing more of ours is committed
        raise DedupFailed(str(exc)) from None


def _absolute(uri: str, io: IOSpec) -> str:
    """A local path made absolute, as Ray workers (in working dirs of their own) must see it."""
    fs, root = open_fs(uri, io.storage_options)
    return root if "file" in fs.protocol or "local" in fs.protocol else uri


def _check_not_inside(input_uri: str, output_uri: str, io: IOSpec) -> None:
    in_fs, in_root = open_fs(input_uri, io.storage_options)
    out_fs, out_root = open_fs(output_uri, io.storage_options)
    base = in_root.rstrip("/")
    if type(in_fs) is type(out_fs) and (out_root.rstrip("/") == base or out_root.startswith(base + "/")):
        raise OutputError(f"output {output_uri!r} is inside input {input_uri!r}: choose an output outside it")


def _on_ray(job: Job, resources: Resources) -> dict[str, int]:
    from matrix_provider.runtime.job import connect_ray

    started_ray = connect_ray()
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        if resources.cpus:
            context.execution_options.resource_limits = ray.data.ExecutionResources(cpu=resources.cpus)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return _stages(job, resources.partitions or max(1, int(ray.cluster_resources().get("CPU", 1))))
    except DedupFailed:
        raise
    except Exception as exc:  # a task's error comes wrapped in Ray's traceback: name its last line
        cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DedupFailed(f"the dedup pipeline failed: {cause}; rerun to resume") from exc
    finally:
        if started_ray:
            ray.shutdown()


def _stages(job: Job, partitions: int) -> dict[str, int]:
    count = len(job.plan.units)
    units = ray.data.from_items([{"unit": i} for i in range(count)], override_num_blocks=count)
    keys = units.map_batches(_keys, batch_size=1, batch_format="numpy", fn_kwargs={"job": job}).materialize()
    documents = keys.map_batches(_documents, batch_format="pyarrow")
    edges = graph.by_key(documents, ["hi", "lo"], graph.candidate_edges, partitions).materialize()
    exact = edges.map_batches(_pairs(exact_only=True), batch_format="pyarrow")
    stars = graph.components(edges.map_batches(_pairs(exact_only=False), batch_format="pyarrow"), partitions)
    by_unit = _by_unit(stars, KIND_NEAR, KIND_ROOT).union(
        _by_unit(exact, KIND_EXACT, KIND_EXACT_ROOT), keys.map_batches(_markers, batch_format="pyarrow")
    )
    results = (
        by_unit.groupby("unit", num_partitions=partitions)
        .map_groups(_write_unit, batch_format="pyarrow", fn_kwargs={"job": job})
        .take_all()
    )
    failures = [row["failure"] for row in results if row["failure"]]
    if failures:
        raise DedupFailed(f"{len(failures)} units failed; rerun to resume. First: {failures[0]}")
    return {
        "clusters": sum(row["clusters"] for row in results),
        "largest_cluster": max((row["largest_cluster"] for row in results), default=0),
        "exact_groups": sum(row["exact_groups"] for row in results),
    }


def _keys(batch: dict[str, np.ndarray], job: Job) -> Iterator[pa.Table]:
    """Every key of every document of one unit, then the unit's marker row."""
    unit = int(batch["unit"][0])
    fingerprints = Fingerprinter(job.params)
    rows: dict[str, list[Any]] = {name: [] for name in _KEYS.names}
    records = 0
    for doc in inputs.documents(job.plan, unit, job.io):
        records += 1
        if doc.row is None:
            continue
        node = job.plan.node(unit, doc.ordinal)
        for hi, lo, exact in fingerprints.keys(doc.row[job.params.text_field]):
            for name, value in zip(_KEYS.names, (node, hi, lo, exact, False), strict=True):
                rows[name].append(value)
        if len(rows["node"]) >= _BATCH_ROWS:
            yield pa.table(rows, schema=_KEYS)
            rows = {name: [] for name in _KEYS.names}
    for name, value in zip(_KEYS.names, (job.plan.node(unit, records), 0, 0, False, True), strict=True):
        rows[name].append(value)
    yield pa.table(rows, schema=_KEYS)


def _documents(block: pa.Table) -> pa.Table:
    return block.filter(pa.compute.invert(block["marker"])).select(["node", "hi", "lo", "exact"])


def _pairs(exact_only: bool) -> Callable[[pa.Table], pa.Table]:
    def pairs(block: pa.Table) -> pa.Table:
        return (block.filter(block["exact"]) if exact_only else block).select(["a", "b"])

    return pairs


def _by_unit(edges: ray.data.Dataset, leaf: int, root: int) -> ray.data.Dataset:
    """Each edge (a, b) as a row for a's unit (a is removed) and one for b's (b is a cluster's root)."""

    def rows(block: pa.Table) -> pa.Table:
        a, b = block["a"].to_numpy(), block["b"].to_numpy()
        return pa.concat_tables([_unit_rows(a, leaf), _unit_rows(b, root)])

    return edges.map_batches(rows, batch_format="pyarrow")


def _unit_rows(node: np.ndarray, kind: int) -> pa.Table:
    return pa.table(
        {
            "unit": pa.array(node >> inputs.ORDINAL_BITS, pa.int64()),
            "node": pa.array(node, pa.int64()),
            "kind": pa.array(np.full(len(node), kind, np.int8)),
        }
    )


def _markers(block: pa.Table) -> pa.Table:
    return _unit_rows(block.filter(block["marker"])["node"].to_numpy(), KIND_UNIT)


def _write_unit(group: pa.Table, job: Job) -> pa.Table:
    """Read one unit again, write its kept rows and commit it (unless committed before); one row with
    the failure, if any, and the figures of the clusters whose kept document is in this unit."""
    unit = int(group["unit"][0].as_py())
    split = job.plan.units[unit]
    node, kind = group["node"].to_numpy(), group["kind"].to_numpy()
    _, sizes = np.unique(node[kind == KIND_ROOT], return_counts=True)
    figures = {
        "clusters": [len(sizes)],
        "largest_cluster": [int(sizes.max()) + 1 if len(sizes) else 0],
        "exact_groups": [len(np.unique(node[kind == KIND_EXACT_ROOT]))],
    }
    ordinals = node & _ORDINALS
    removed = dict.fromkeys(ordinals[kind == KIND_NEAR].tolist(), "removed_near")
    removed.update(dict.fromkeys(ordinals[kind == KIND_EXACT].tolist(), "removed_exact"))
    failure = ""
    if split.uid not in job.committed:
        try:
            _write(job, unit, removed, int(ordinals[kind == KIND_UNIT][0]))
        except Exception as exc:  # named by the job with its unit; a rerun redoes this unit
            failure = f"unit {split.key}: {type(exc).__name__}: {exc}"
    return pa.table({"failure": [failure], **figures})


def _write(job: Job, unit: int, removed: dict[int, str], expected: int) -> dict[str, Any]:
    split = job.plan.units[unit]
    writer = output.KeptWriter(job.target, split, job.io.part_rows)
    counts: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    examples: list[dict[str, str]] = []
    for doc in inputs.documents(job.plan, unit, job.io):
        counts["rows_in"] += 1
        if doc.row is None:
            counts["rows_skipped" if doc.skipped else "rows_error"] += 1
            reasons[reason_key(doc.reason or "")] += 1
            if not doc.skipped and len(examples) < _EXAMPLES:
                examples.append({"id": doc.record.id, "reason": doc.reason or ""})
        elif doc.ordinal in removed:
            counts[removed[doc.ordinal]] += 1
        else:
            writer.add({**doc.row, job.params.id_field: doc.record.id})
            counts["rows_ok"] += 1
    if counts["rows_in"] != expected:
        raise DedupFailed(f"it had {expected} records when its keys were made and {counts['rows_in']} now")
    return writer.commit(
        {
            **{k: counts[k] for k in ("rows_in", "rows_ok", "rows_error", "rows_skipped")},
            "rows_filtered": counts["removed_exact"] + counts["removed_near"],
            "removed_exact": counts["removed_exact"],
            "removed_near": counts["removed_near"],
            "reasons": dict(reasons.most_common(_TOP_REASONS)),
            "error_examples": examples,
        }
    )


def _manifest(job: Job, records: list[dict[str, Any]], figures: dict[str, int]) -> dict[str, Any]:
    total: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    for record in records:
        for key in (
            "rows_in",
            "rows_ok",
            "rows_filtered",
            "rows_error",
            "rows_skipped",
            "removed_exact",
            "removed_near",
        ):
            total[key] += record.get(key, 0)
        reasons.update(record.get("reasons", {}))
    resumed = [r for r in records if r["unit_id"] in job.committed]
    return {
        "pipeline": "dedup",
        "input": job.plan.uri,
        "output": job.target.uri,
        "units": len(job.plan.units),
        "units_resumed": len(resumed),
        "rows_resumed": sum(r["rows_in"] for r in resumed),
        **{k: total[k] for k in ("rows_in", "rows_ok", "rows_filtered", "rows_error", "rows_skipped")},
        "dedup": {
            "rows_kept": total["rows_ok"],
            "rows_removed": total["rows_filtered"],
            "removed_exact": total["removed_exact"],
            "removed_near": total["removed_near"],
            **figures,
            "params": job.params.as_dict(),
        },
        "error_reasons": dict(reasons.most_common(_TOP_REASONS)),
        "error_examples": [e for r in records for e in r.get("error_examples", [])][:_EXAMPLES],
        "config_hash": job.params.config_hash(),
        "version": __version__,
    }
