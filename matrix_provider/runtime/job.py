"""One run of a pipeline: check everything, take the output, hand out work units, write the manifest.

Used by `matrix run` on a laptop and as the entrypoint of the Ray job the Airflow operator
submits. All checks that can fail on user input (spec, input, output, LLM backend) run before any
row is admitted, and raise `USAGE_ERRORS` with one clear message.

The job process is the run's supervisor, outside the rows' path: it takes the output's lease,
hands units to drivers (a few ahead each, so no driver waits between units), hands a dead driver's
units to the others, pings every agent each `orchestrator.audit_interval_s` and tells the drivers
when one died or restarted, and writes `_SUCCESS` only when every unit of the input is committed
and published. Its state is the list of units and their commit records (summaries included, as
sums): nothing grows with the number of rows. A run that finds its lease taken over stops at its
next write and fails naming the run that took over.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from matrix_provider import __version__, names
from matrix_provider.llm import backends
from matrix_provider.runtime.actors import ActorInitFailed, RunActors
from matrix_provider.runtime.lease import Lease, StaleRun, take_output
from matrix_provider.runtime.pipeline import Pipeline, load_pipeline
from matrix_provider.runtime.progress import Reporter, print_summary
from matrix_provider.runtime.records import Split
from matrix_provider.runtime.sink import OutputError, OutputIncomplete, OutputStore, PartMissing
from matrix_provider.runtime.sources import InputChanged, InputError, list_inputs, open_fs, plan_units, split_size
from matrix_provider.runtime.spec import PipelineSpec, SpecError
from matrix_provider.runtime.summary import sum_counts
from matrix_provider.sandbox import backends as sandbox_backends
from matrix_provider.sandbox.pool import SandboxPoolActor

USAGE_ERRORS = (SpecError, InputError, OutputError, backends.BackendError)
_POLL_S = 0.5
_UNITS_AHEAD = 2  # units handed to a driver before its first is done: reading overlaps the tail
_MAX_UNITS_AHEAD = 16  # more while its rows in flight stay under its concurrency (small files)
_UNIT_ATTEMPTS = 3  # a unit whose driver died or failed is handed out again, this many times in all
_POOL_CLOSE_S = 10.0  # pools kill their sandboxes before they are killed (the `none` backend has no die-with-parent)
# Settings a run's workers need but that name no secret: the cluster's nodes hold the credentials
# (their environment, an instance role or a mounted secret), never a job's runtime_env, which the
# dashboard and the State API show to anyone who can read them.
FORWARDED_ENV = frozenset({"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MATRIX_SERVE_PORT"})


class RunFailed(RuntimeError):
    """The run started but could not finish (a driver died, the cluster went away)."""


def check_pipeline(spec: PipelineSpec) -> Pipeline:
    try:
        pipeline = load_pipeline(spec.pipeline)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    if pipeline.check_params is not None:
        try:
            pipeline.check_params(spec.params)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    missing = set(pipeline.roles) - set(spec.roles)
    extra = set(spec.roles) - set(pipeline.roles)
    if missing or extra:
        raise SpecError(
            f"roles of pipeline {pipeline.name!r} are {sorted(pipeline.roles)}; "
            + (f"spec lacks {sorted(missing)} " if missing else "")
            + (f"spec has unknown {sorted(extra)}" if extra else "")
        )
    return pipeline


def connect_ray() -> bool:
    """Join RAY_ADDRESS when set, else start a local Ray; True when we started it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Workers on an existing cluster do not share our environment: forward the storage settings
        # that name no secret (FORWARDED_ENV).
        forwarded = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV and k not in _job_env_vars()}
        ray.init(
            address=address,
            namespace=names.NAMESPACE,
            log_to_driver=True,
            runtime_env={"env_vars": forwarded} if forwarded else None,
        )
        return False
    # "local" starts a fresh Ray even when an earlier cluster on this machine left its address behind.
    ray.init(address="local", namespace=names.NAMESPACE, include_dashboard=False, log_to_driver=True)
    return True


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the Ray job this driver runs as (Ray refuses a ray.init that names one again)."""
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray Jobs for its entrypoint
    if not injected:
        return {}
    return (json.loads(injected).get("runtime_env") or {}).get("env_vars") or {}


def run_backend(spec: PipelineSpec) -> Any:
    """The spec's LLM backend as a run deploys it: a served backend without an app name is named
    by its settings, so runs (and benchmarks) with equal settings share one deployment."""
    llm = spec.llm
    if getattr(llm, "app_name", "unset") is None:
        llm = llm.model_copy(update={"app_name": f"matrix-{llm.backend}-{backend_app_suffix(spec)}"})
    return llm


def backend_app_suffix(spec: PipelineSpec) -> str:
    """Names a backend deployment by its settings and our version, so equal settings reuse it."""
    client_side = {"timeout_s", "retries", "backoff_s", "max_connections", "sticky_buckets", "app_name"}
    served = spec.llm.model_dump_json(exclude=client_side)
    return hashlib.sha256((served + __version__).encode()).hexdigest()[:8]


def check_output_location(spec: PipelineSpec, store: OutputStore) -> None:
    """Refuse an output inside the input: the next run would read its own output back."""
    in_fs, in_root = open_fs(spec.run.input, spec.io.storage_options)
    if type(in_fs) is not type(store.fs):
        return
    base = in_root.split("*", 1)[0].rsplit("/", 1)[0] if any(ch in in_root for ch in "*?[") else in_root
    base, out = posixpath.normpath(base), posixpath.normpath(store.root)
    if out == base or out.startswith(base.rstrip("/") + "/"):
        raise OutputError(
            f"output {spec.run.output!r} is inside input {spec.run.input!r}: a later run would read the output "
            "back as input; choose an output outside the input"
        )


def check_cluster_storage(store: OutputStore) -> None:
    """A local output on a multi-node cluster would be split over the nodes' disks: refuse it."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if store.local and len(nodes) > 1:
        raise OutputError(
            f"output {store.uri!r} is a local path, but the Ray cluster has {len(nodes)} nodes and each would "
            "write its own disk: use shared object storage, e.g. --output s3://bucket/path"
        )


def run(spec: PipelineSpec, *, quiet: bool = False) -> dict[str, Any]:
    started = time.time()
    pipeline = check_pipeline(spec)
    if pipeline.uses_sandbox:
        sandbox_backends.require(spec.sandbox)
    fs, files = list_inputs(spec.run.input, spec.io)
    store = OutputStore(spec.run.output, spec.io.storage_options, spec.io.write_retries)
    check_output_location(spec, store)
    store.check_writable()
    meta = {
        "pipeline": pipeline.name,
        "config_hash": spec.config_hash(),
        "version": __version__,
        "split_bytes": split_size(files, spec.io, spec.run.partitions),
        "spec": spec.model_dump(mode="json", exclude={"run"}),
    }
    lease, epoch_meta = take_output(store, uuid.uuid4().hex[:8], meta, spec.run.overwrite, spec.io.lease_ttl_s)
    try:
        manifest = _run_epoch(spec, pipeline, store, lease, fs, files, epoch_meta, quiet, started)
    except (StaleRun, PartMissing, OutputIncomplete) as exc:
        raise RunFailed(str(exc)) from None
    finally:
        lease.release()
    if not quiet:
        print_summary(manifest)
    return manifest


def _run_epoch(
    spec: PipelineSpec,
    pipeline: Pipeline,
    store: OutputStore,
    lease: Lease,
    fs: Any,
    files: list[Split],
    epoch_meta: dict[str, Any],
    quiet: bool,
    started: float,
) -> dict[str, Any]:
    """Everything a run does while it holds the lease: plan, run what is not committed, finish."""
    # On a resume the stored unit size wins over this run's, so the units are the same.
    units = plan_units(fs, files, epoch_meta["split_bytes"])
    records = store.unit_records(lease.epoch)
    resumed = {u.uid for u in units if u.uid in records}
    todo = [u for u in units if u.uid not in records]
    extra: dict[str, Any] = {}
    if todo:
        extra = _run_units(spec, pipeline, store, lease, todo, records, quiet)
    lease.check()
    manifest = summarize(spec, pipeline, units, records, resumed)
    manifest.update(extra, epoch=lease.epoch, generation=lease.generation, config_hash=epoch_meta["config_hash"])
    planned = {u.uid: records[u.uid] for u in units}
    manifest["units_dropped"] = len(records) - len(planned)
    manifest["orphans_removed"] = store.complete(lease.epoch, planned, lease.check)
    manifest.update(wall_seconds=round(time.time() - started, 3), run_id=lease.run_id)
    manifest["tokens_per_s"] = round(manifest.pop("run_tokens") / max(manifest["wall_seconds"], 1e-9), 2)
    store.finish(manifest, lease.check)
    lease.check()  # a takeover while the output was being finished shows here: the run fails
    return manifest


@contextmanager
def _ray_session() -> Iterator[None]:
    started_ray = connect_ray()
    try:
        yield
    finally:
        if started_ray:
            ray.shutdown()


def _run_units(
    spec: PipelineSpec,
    pipeline: Pipeline,
    store: OutputStore,
    lease: Lease,
    todo: list[Split],
    records: dict[str, dict[str, Any]],
    quiet: bool,
) -> dict[str, Any]:
    """Start the actors, run every unit of `todo` into `records`; returns this run's own figures."""
    with _ray_session():
        check_cluster_storage(store)
        client_config = None
        if any(role.uses_llm for role in pipeline.roles.values()):
            client_config = backends.deploy(run_backend(spec))
            backends.probe(client_config)
        actors = RunActors(spec, pipeline, lease.run_id, lease.generation, lease.epoch, client_config)
        pools: list[Any] = []
        try:
            if pipeline.uses_sandbox:
                pools.extend(_start_sandbox_pools(spec, lease.run_id))
            actors.start()
            resumed_rows = sum(r["rows_in"] for r in records.values())
            reporter = Reporter(len(todo), resumed_rows, spec.run.progress_every_s, quiet)
            scheduler = UnitScheduler(spec, actors, lease, reporter)
            scheduler.run(todo, records)
            if scheduler.changed:
                lease.check()  # a run taken over while it read says so, not that its input changed
                raise RunFailed(
                    f"{len(scheduler.changed)} input file(s) changed while the run read them, e.g. "
                    f"{scheduler.changed[0]}; every other unit is committed: rerun to process the new versions"
                )
            return {
                **_agent_figures(list(actors.agents.values())),
                "peak_rows_in_flight": scheduler.peak_in_flight,
                "peak_rows_held": scheduler.peak_held,
            }
        finally:
            actors.kill()
            if pools:  # after the agents: no call starts a sandbox once its pool closed
                ray.wait([pool.close.remote() for pool in pools], num_returns=len(pools), timeout=_POOL_CLOSE_S)
            for pool in pools:
                ray.kill(pool, no_restart=True)


def _start_sandbox_pools(spec: PipelineSpec, run_id: str) -> list[Any]:
    """The tool sandbox pools, before the agents that look them up by name; SPREAD spreads them over the nodes."""
    return [
        SandboxPoolActor.options(
            name=names.sandbox_name(run_id, i), namespace=names.NAMESPACE, num_cpus=0, scheduling_strategy="SPREAD"
        ).remote(spec.sandbox)
        for i in range(spec.sandbox.pools)
    ]


def _agent_figures(agents: list[Any]) -> dict[str, int]:
    figures = collections.Counter({"llm_requests": 0, "llm_retries": 0, "step_retries": 0})
    refs = [a.stats.remote() for a in agents]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10) if refs else ([], [])
    for ref in ready:
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayError:  # an agent that died: its counts are gone with it
            continue
        for key in figures:
            figures[key] += stats[key]
    return dict(figures)


class Pinger:
    """Non-blocking calls to a set of actors: at most one call under way per actor."""

    def __init__(self, actors: dict[str, Any], method: str):
        self.actors = actors
        self.method = method
        self.pending: dict[str, Any] = {}

    def send(self) -> None:
        for name, actor in self.actors.items():
            if name not in self.pending:
                self.pending[name] = getattr(actor, self.method).remote()

    def answers(self) -> dict[str, Any]:
        """{name: value or the exception} for the calls that finished."""
        if not self.pending:
            return {}
        refs = list(self.pending.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = {name: ref for name, ref in self.pending.items() if ref in set(ready)}
        out: dict[str, Any] = {}
        for name, ref in done.items():
            del self.pending[name]
            try:
                out[name] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                out[name] = exc
        return out


class UnitScheduler:
    """Hands units to drivers, re-queues a dead driver's units, watches agents, reports progress."""

    def __init__(self, spec: PipelineSpec, actors: RunActors, lease: Lease, reporter: Reporter):
        self.spec = spec
        self.actors = actors
        self.drivers = actors.drivers  # grows when the second wave starts
        self.lease = lease
        self.reporter = reporter
        self.units_done = 0
        self.incarnations: dict[str, str] = {}
        self.agent_pings = Pinger(actors.agents, "incarnation")
        self.stats_pings = Pinger({}, "stats")
        self.stats: dict[str, dict[str, Any]] = {}
        self.suspect: set[int] = set()
        self.next_ping = 0.0
        self.peak_in_flight = 0  # the most rows in flight the drivers reported at once
        self.peak_held = 0  # the most rows one driver held unwritten (in flight or buffered)
        self.changed: list[str] = []  # why units whose file changed under the run were left

    def run(self, todo: list[Split], records: dict[str, dict[str, Any]]) -> None:
        queue = collections.deque((unit, 1) for unit in todo)
        outstanding: dict[Any, tuple[int, Split, int]] = {}
        load: collections.Counter[int] = collections.Counter()
        try:
            while queue or outstanding:
                try:
                    second_wave = self.actors.poll()
                except ActorInitFailed as exc:
                    raise RunFailed(str(exc)) from None
                if second_wave:  # learn its agents' incarnations from the start
                    self.agent_pings.send()
                for p, driver in enumerate(self.drivers):
                    self.stats_pings.actors.setdefault(str(p), driver)
                    while queue and load[p] < self._units_ahead(p, load[p]) and p not in self.suspect:
                        unit, attempt = queue.popleft()
                        outstanding[driver.run_unit.remote(unit)] = (p, unit, attempt)
                        load[p] += 1
                waits = [*outstanding, *self.actors.waiting()]
                if waits:
                    ready, _ = ray.wait(waits, num_returns=1, timeout=_POLL_S)
                else:  # every driver is restarting: wait for one to answer again
                    ready = []
                    time.sleep(_POLL_S)
                for ref in ready:
                    if ref not in outstanding:  # an actor of the first wave answered
                        continue
                    p, unit, attempt = outstanding.pop(ref)
                    load[p] -= 1
                    failure = self._collect(ref, unit, records, p)
                    if failure is not None and failure.startswith(_CHANGED):
                        self.changed.append(failure.removeprefix(_CHANGED))
                    elif failure is not None:
                        if attempt >= _UNIT_ATTEMPTS:
                            raise RunFailed(f"unit {unit.key} failed {attempt} times; last: {failure}")
                        queue.append((unit, attempt + 1))
                if self.lease.lost:
                    raise RunFailed(self.lease.lost)
                self._watch()
        finally:
            self.reporter.close()

    def _units_ahead(self, p: int, load: int) -> int:
        """Units driver `p` may hold: two, then one more each time its latest figures count every unit
        it holds, all of them read, and fewer rows in flight than its concurrency. So files smaller
        than the rows in flight do not cap them, while a driver still reading (big units, or rows the
        admission check drops as fast as they are read) keeps its reading ahead and buffers at two."""
        stats = self.stats.get(str(p))
        if (
            stats is None
            or stats["open_units"] < load
            or stats["units_reading"]
            or stats["in_flight"] >= self.spec.run.concurrency
        ):
            return _UNITS_AHEAD
        return min(load + 1, _MAX_UNITS_AHEAD)

    def _collect(self, ref: Any, unit: Split, records: dict[str, dict[str, Any]], p: int) -> str | None:
        """Take a finished unit's record; returns why it failed, if it did (`_CHANGED` first for a
        unit whose file changed under the run: it is not tried again)."""
        try:
            records[unit.uid] = ray.get(ref)
            self.units_done += 1
            return None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, StaleRun):
                raise RunFailed(str(cause)) from None
            if isinstance(cause, InputChanged):
                return _CHANGED + str(cause)
            return f"driver {p}: {type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}"
        except ray.exceptions.RayError as exc:  # the driver died (node lost, OOM): Ray restarts it
            _fail_if_gone(exc, p)
            self.suspect.add(p)
            return f"driver {p} died: {type(exc).__name__}"

    def _watch(self) -> None:
        """Ping agents and drivers; an agent with a new incarnation or none makes drivers audit."""
        now = time.monotonic()
        if now >= self.next_ping:
            self.next_ping = now + self.spec.orchestrator.audit_interval_s
            self.agent_pings.send()
        for name, answer in self.agent_pings.answers().items():
            known = self.incarnations.get(name)
            if isinstance(answer, str):
                self.incarnations[name] = answer
            if isinstance(answer, Exception) or (known is not None and answer != known):
                for driver in self.drivers:
                    driver.agent_lost.remote(name)
        self.stats_pings.send()
        for name, answer in self.stats_pings.answers().items():
            if isinstance(answer, dict):
                self.stats[name] = answer
                self.suspect.discard(int(name))
            elif isinstance(answer, ray.exceptions.RayError):
                _fail_if_gone(answer, int(name))
        if self.stats:
            totals = {k: sum(s[k] for s in self.stats.values()) for k in next(iter(self.stats.values()))}
            self.peak_held = max(s["peak_held"] for s in self.stats.values())
            self.peak_in_flight = max(self.peak_in_flight, totals["in_flight"])
            self.reporter.update(totals, self.units_done)


_CHANGED = "changed: "


def _fail_if_gone(exc: ray.exceptions.RayError, partition: int) -> None:
    """A driver whose restart failed in its constructor is dead for good (Ray will not try again):
    fail the run now, with its cause, instead of waiting for it (a one-partition run would spin)."""
    if isinstance(exc, ray.exceptions.RayActorError) and exc.actor_init_failed:
        cause = str(exc).strip().splitlines()[-1][:300]
        raise RunFailed(f"partition driver {partition} died and could not be restarted: {cause}")


def summarize(
    spec: PipelineSpec,
    pipeline: Pipeline,
    units: list[Split],
    records: dict[str, dict[str, Any]],
    resumed: set[str],
) -> dict[str, Any]:
    """The manifest: the sum of the input's commit records, after checking rows out = rows in per unit."""
    missing = [u.key for u in units if u.uid not in records]
    if missing:
        raise RunFailed(
            f"{len(missing)} of {len(units)} units were not committed (e.g. {missing[:3]}); rerun to resume"
        )
    mine = [records[u.uid] for u in units]
    for record in mine:
        written = sum(part["rows"] for part in record["parts"])
        if written != record["rows_in"]:
            raise RunFailed(f"unit {record['unit']}: {record['rows_in']} rows in but {written} written")
    total = collections.Counter[str]()
    reasons = collections.Counter[str]()
    for record in mine:
        for key in ("rows_in", "rows_ok", "rows_filtered", "rows_error", "prompt_tokens", "completion_tokens"):
            total[key] += record[key]
        reasons.update(record.get("reasons", {}))
    this_run = [records[u.uid] for u in units if u.uid not in resumed]
    summary = {}
    if pipeline.summary is not None:
        summary = {"summary": pipeline.summary.finish(sum_counts(r.get("summary", {}) for r in mine))}
    return {
        "pipeline": pipeline.name,
        "input": spec.run.input,
        "output": spec.run.output,
        "units": len(units),
        "units_resumed": len(resumed),
        "rows_in": total["rows_in"],
        "rows_out": sum(total[k] for k in ("rows_ok", "rows_filtered", "rows_error")),
        "rows_ok": total["rows_ok"],
        "rows_filtered": total["rows_filtered"],
        "rows_error": total["rows_error"],
        "rows_resumed": sum(records[uid]["rows_in"] for uid in resumed) + sum(r["rows_resumed"] for r in this_run),
        "rows_redelivered": sum(r.get("rows_redelivered", 0) for r in this_run),
        "prompt_tokens": total["prompt_tokens"],
        "completion_tokens": total["completion_tokens"],
        "run_tokens": sum(r["prompt_tokens"] + r["completion_tokens"] for r in this_run),
        "partitions": spec.run.partitions,
        "concurrency": spec.run.concurrency,
        "llm_backend": spec.llm.backend,
        "error_reasons": dict(reasons.most_common(10)),
        "version": __version__,
        "spec": json.loads(spec.model_dump_json(exclude={"run"})),
        **summary,
    }
