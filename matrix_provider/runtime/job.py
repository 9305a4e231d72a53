"""One run of a pipeline: check everything, start the actors, watch progress, write the manifest.

Used by `matrix run` on a laptop and as the entrypoint of the Ray job the Airflow operator
submits. All checks that can fail on user input (spec, input, output, LLM backend) run before any
row is admitted, and raise `UsageError` subclasses with one clear message.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import time
import uuid
from typing import Any

import ray

from matrix_provider import __version__
from matrix_provider.llm import backends
from matrix_provider.runtime import names
from matrix_provider.runtime.agents import Agent
from matrix_provider.runtime.driver import PartitionDriver
from matrix_provider.runtime.ledger import IdLedger
from matrix_provider.runtime.pipeline import Pipeline, load_pipeline
from matrix_provider.runtime.progress import Reporter, print_summary
from matrix_provider.runtime.sink import OutputError, OutputStore
from matrix_provider.runtime.sources import InputError, list_inputs, plan
from matrix_provider.runtime.spec import PipelineSpec, SpecError

USAGE_ERRORS = (SpecError, InputError, OutputError, backends.BackendError)
_POLL_S = 0.5
FORWARDED_ENV = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "MATRIX_SERVE_PORT",
    }
)
_REASON_DETAIL = re.compile(r"\s*\([^)]*\)")  # "too short (12 words)" counts as "too short"


class RunFailed(RuntimeError):
    """The run started but could not finish (a driver died, the cluster went away)."""


def check_pipeline(spec: PipelineSpec) -> Pipeline:
    try:
        pipeline = load_pipeline(spec.pipeline)
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
        # Workers on an existing cluster do not share our environment: forward the standard storage
        # settings (set them on the nodes or use instance roles to keep keys out of runtime_env).
        forwarded = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV}
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


def backend_app_suffix(spec: PipelineSpec) -> str:
    """Names a backend deployment by its settings and our version, so equal settings reuse it."""
    client_side = {"timeout_s", "retries", "backoff_s", "max_connections", "sticky_buckets", "app_name"}
    served = spec.llm.model_dump_json(exclude=client_side)
    return hashlib.sha256((served + __version__).encode()).hexdigest()[:8]


def run(spec: PipelineSpec, *, quiet: bool = False) -> dict[str, Any]:
    started = time.time()
    pipeline = check_pipeline(spec)
    fs, files = list_inputs(spec.run.input, spec.io)
    store = OutputStore(spec.run.output, spec.io.storage_options)
    store.check_writable()
    config_hash = spec.config_hash()
    store.claim(
        {
            "pipeline": pipeline.name,
            "config_hash": config_hash,
            "version": __version__,
            "spec": spec.model_dump(mode="json", exclude={"run"}),
        },
        spec.run.overwrite,
    )
    committed = store.committed_ids()

    started_ray = connect_ray()
    actors: list[Any] = []
    try:
        client_config = None
        if any(role.uses_llm for role in pipeline.roles.values()):
            llm = spec.llm
            if getattr(llm, "app_name", "unset") is None:
                llm = llm.model_copy(update={"app_name": f"matrix-{llm.backend}-{backend_app_suffix(spec)}"})
            client_config = backends.deploy(llm)
            backends.probe(client_config)
        manifest = _execute(spec, pipeline, fs, files, store, committed, client_config, actors, quiet)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started_ray:
            ray.shutdown()
    manifest.update(wall_seconds=round(time.time() - started, 3), config_hash=config_hash)
    manifest["tokens_per_s"] = round(manifest.pop("run_tokens") / max(manifest["wall_seconds"], 1e-9), 2)
    store.finish(manifest)
    if not quiet:
        print_summary(manifest)
    return manifest


def _execute(
    spec: PipelineSpec,
    pipeline: Pipeline,
    fs: Any,
    files: list[Any],
    store: OutputStore,
    committed: list[str],
    client_config: Any,
    actors: list[Any],
    quiet: bool,
) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    run_token = time.strftime("%Y%m%dT%H%M%S") + "-" + run_id
    spec_json = spec.model_dump_json()
    big = 100_000  # async actors: concurrency is bounded by our own queues and semaphores
    actors.append(IdLedger.options(name=names.ledger_name(run_id), namespace=names.NAMESPACE).remote(committed))

    def agent(role: str, i: int) -> Any:
        role_spec = spec.roles[role]
        return Agent.options(
            name=names.agent_name(run_id, role, i),
            namespace=names.NAMESPACE,
            num_cpus=role_spec.num_cpus,
            num_gpus=role_spec.num_gpus,
            resources=role_spec.resources or None,
            max_concurrency=big,
        ).remote(run_id, role, spec_json, client_config)

    # Ray starts worker processes about in the order actors are created, a few at a time. One
    # replica of every role and the drivers come first, so rows flow while further replicas start.
    agents = [agent(role, 0) for role in spec.roles]
    actors.extend(agents)
    shards = plan(fs, files, spec.io, spec.run.partitions)
    drivers = []
    for p, shard in enumerate(shards):
        driver = PartitionDriver.options(
            name=names.driver_name(run_id, p),
            namespace=names.NAMESPACE,
            num_cpus=spec.resources.driver_num_cpus,
            max_concurrency=big,
        ).remote(run_id, p, spec_json, shard, run_token)
        drivers.append(driver)
        actors.append(driver)
    more = [agent(role, i) for role, role_spec in spec.roles.items() for i in range(1, role_spec.replicas)]
    actors.extend(more)
    agents += more
    pending = [d.run.remote() for d in drivers]
    reporter = Reporter(None, quiet=quiet)
    try:
        while True:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
            stats = ray.get([d.stats.remote() for d in drivers])
            totals = {k: sum(s[k] for s in stats) for k in stats[0] if k != "partition"}
            reporter.update(totals)
            if len(done) == len(pending):
                break
        try:
            results = ray.get(pending)
        except ray.exceptions.RayError as exc:
            raise RunFailed(f"a partition driver failed: {exc}") from None
    finally:
        reporter.close()
    manifest = summarize(spec, pipeline, store, results)
    agent_stats = ray.get([a.stats.remote() for a in agents])
    for key in ("llm_requests", "llm_retries", "step_retries"):
        manifest[key] = sum(s[key] for s in agent_stats)
    return manifest


def summarize(
    spec: PipelineSpec, pipeline: Pipeline, store: OutputStore, results: list[dict[str, Any]]
) -> dict[str, Any]:
    """The manifest, counted from the committed output itself (and checked for duplicate ids)."""
    table = store.read_columns(["id", "status", "error", "prompt_tokens", "completion_tokens"])
    ids = table.column("id").to_pylist()
    statuses = collections.Counter(table.column("status").to_pylist())
    duplicates = len(ids) - len(set(ids))
    if duplicates:
        raise RunFailed(f"output has {duplicates} duplicate ids: the sink's exactly-once check failed")
    reasons = collections.Counter(
        _REASON_DETAIL.sub("", reason)[:100]
        for reason, status in zip(table.column("error").to_pylist(), table.column("status").to_pylist(), strict=True)
        if status != "ok" and reason
    )
    return {
        "pipeline": pipeline.name,
        "input": spec.run.input,
        "output": spec.run.output,
        "rows_in": sum(r["rows_in"] for r in results),
        "rows_out": len(ids),
        "rows_ok": statuses.get("ok", 0),
        "rows_filtered": statuses.get("filtered", 0),
        "rows_error": statuses.get("error", 0),
        "rows_resumed": sum(r["rows_resumed"] for r in results),
        "rows_redelivered": sum(r["rows_redelivered"] for r in results),
        "prompt_tokens": int(sum(v or 0 for v in table.column("prompt_tokens").to_pylist())),
        "completion_tokens": int(sum(v or 0 for v in table.column("completion_tokens").to_pylist())),
        "run_tokens": sum(r["prompt_tokens"] + r["completion_tokens"] for r in results),
        "partitions": spec.run.partitions,
        "concurrency": spec.run.concurrency,
        "llm_backend": spec.llm.backend,
        "error_reasons": dict(reasons.most_common(10)),
        "version": __version__,
        "spec": json.loads(spec.model_dump_json(exclude={"run"})),
    }
