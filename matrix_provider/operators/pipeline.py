"""MatrixPipelineOperator: run a matrix pipeline as a Ray job, deferrable, re-attaching, killable.

Flow (the shape of Airflow's Databricks and BigQuery operators): render and check the arguments,
then submit the job under a submission id derived from the task instance *and a hash of the work*
(rendered entrypoint, runtime_env, driver placement, provider version). A plain retry or a
restarted worker finds that id on the cluster and re-attaches to a running job, or returns at once
if it already succeeded; a cleared task whose work changed (other overrides, other code, another
shard under the same map index) gets a new id and runs. `force_rerun=True` adds the try number.
After a failure it submits again (as `<id>-r1`, `-r2`, …), and the sink's resume makes that cheap.

Then defer to MatrixRayJobTrigger (or poll in the worker), or return the submission at once with
`wait_for_completion=False` for a MatrixRayJobSensor to wait on. The XCom value is the run's
manifest, and each outlet Asset event carries the manifest counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shlex
import time
from collections.abc import Sequence
from typing import Any

from airflow.providers.common.compat.sdk import conf
from airflow.sdk import Asset, AssetAlias, BaseOperator

from matrix_provider import __version__
from matrix_provider.hooks.ray_jobs import ACTIVE, MatrixRayHook, RayJobsError
from matrix_provider.links.ray import (
    CLUSTER_KEY,
    CONN_ID_KEY,
    GRAFANA_URL_KEY,
    RAY_JOB_URL_KEY,
    GrafanaLink,
    RayJobLink,
    grafana_url,
    ray_job_url,
)
from matrix_provider.operators.lineage import lineage_for
from matrix_provider.operators.outcome import (
    AirflowException,
    failure_message,
    manifest_of,
    outlet_extra,
    will_retry,
)
from matrix_provider.protocol import shipped_pipelines
from matrix_provider.triggers.ray_job import MatrixRayJobTrigger, first_event

_MAX_RESUBMITS = 1000
_PLACEMENT = ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources")


def deployment() -> str:
    """`[matrix] deployment`: which Airflow made a job, so two sharing a Ray cluster never meet."""
    return conf.get("matrix", "deployment", fallback="") or ""


def submission_id_for(dag_id: str, task_id: str, run_id: str, map_index: int, work: str = "") -> str:
    """Deterministic and Ray-safe: the same task instance of the same deployment doing the same work
    names the same job."""
    where = deployment()
    slug = re.sub(r"[^a-z0-9]+", "-", f"{where}-{dag_id}-{task_id}".lower()).strip("-")[:60]
    key = f"{dag_id}|{task_id}|{run_id}|{map_index}|{work}" + (f"|{where}" if where else "")
    return f"matrix-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def default_outlet(dag_id: str, task_id: str) -> Asset:
    """One asset per (DAG, task): two DAGs with a `curate` task must not feed each other."""
    return Asset(name=f"matrix-{dag_id}-{task_id}", uri=f"matrix://{dag_id}/{task_id}")


def _with_default_outlets(task_id: str, kwargs: dict[str, Any], alias: str | None, waits: bool) -> dict[str, Any]:
    """Outlets: the task's own, else its default asset; plus the output alias when one is named.

    Fire-and-forget tasks (`waits` False) get no default asset: they end before any data exists.
    Idempotent, because a mapped task passes through here at `partial()` and again when unmapped.
    """
    if "outlets" in kwargs:
        outlets = list(kwargs["outlets"] or [])
    else:
        from airflow.sdk.definitions._internal.contextmanager import DagContext, TaskGroupContext

        dag = kwargs.get("dag") or DagContext.get_current()
        group = (kwargs.get("task_group") or TaskGroupContext.get_current(dag)) if dag else None
        full_id = group.child_id(task_id) if group else task_id
        outlets = [default_outlet(dag.dag_id, full_id)] if dag is not None and waits else []
    if alias and not any(isinstance(o, AssetAlias) and o.name == alias for o in outlets):
        outlets.append(AssetAlias(name=alias))
    return {**kwargs, "outlets": outlets}


def _owner(ti: Any) -> dict[str, str]:
    """The job metadata naming the task instance (and deployment, when set: jobs of an unnamed
    deployment, and those of earlier versions, carry no such key) a job belongs to."""
    where = deployment()
    return {
        **({"airflow_deployment": where} if where else {}),
        "airflow_dag_id": ti.dag_id,
        "airflow_task_id": ti.task_id,
        "airflow_run_id": ti.run_id,
        "airflow_map_index": str(getattr(ti, "map_index", -1)),
    }


class MatrixPipelineOperator(BaseOperator):
    """Run a matrix pipeline over `input_uri` into `output_uri` as a Ray job.

    :param pipeline: shipped pipeline name (e.g. ``natural_reasoning``) or a YAML path on the cluster.
    :param input_uri: file, folder or glob; local to the cluster or ``s3://``. Templated.
    :param output_uri: output folder; rerunning on it resumes. Templated.
    :param partitions: data-parallel partition drivers. Templated.
    :param concurrency: rows in flight per partition. Templated.
    :param overrides: Hydra overrides, e.g. ``{"llm": "sim", "roles.score.replicas": 4}``. Templated.
    :param ray_conn_id: connection of type ``matrix_ray`` (Ray dashboard host/port, token as password). Templated.
    :param cluster: instead of a connection, the cluster a setup task brought up for this DAG run
        (``MatrixSlurmClusterOperator(...).output``: dashboard address and token file, no token).
    :param runtime_env: Ray runtime_env for the job (e.g. ``{"pip": [...]}``); never put secrets here.
    :param deferrable: wait in the triggerer instead of holding a worker slot
        (default: ``[operators] default_deferrable``).
    :param wait_for_completion: False returns ``{"ray_submission_id": …}`` once the job is submitted.
    :param force_rerun: a new Ray job on every try, even when an identical one already succeeded.
    :param poll_interval: seconds between status checks.
    :param outage_budget_s: how long a dashboard outage is waited out before the task fails
        (the Ray job keeps running; a retry re-attaches to it).
    :param overwrite: replace an output written by a different config.
    :param output_alias: an AssetAlias name; each success adds the real output folder to it.
    :param entrypoint_num_cpus: CPUs reserved for the job's driver (Ray Jobs API), likewise
        ``entrypoint_num_gpus``, ``entrypoint_memory`` (bytes) and ``entrypoint_resources``.
    :param matrix_command: the `matrix` executable on the cluster.
    :param cancel_on_kill: stop the Ray job when the task is killed (default); False leaves it running
        for a retry to re-attach to, e.g. where workers are evicted (a SIGTERM also counts as a kill).
    """

    template_fields: Sequence[str] = (
        "pipeline",
        "input_uri",
        "output_uri",
        "overrides",
        "ray_conn_id",
        "cluster",
        "partitions",
        "concurrency",
        "runtime_env",
        "placement",
    )
    template_fields_renderers = {"overrides": "json", "runtime_env": "json", "placement": "json"}
    operator_extra_links = (RayJobLink(), GrafanaLink())
    ui_color = "#e8f0fe"

    @classmethod
    def partial(cls, *, task_id: str, **kwargs: Any) -> Any:  # type: ignore[override]
        """Mapped tasks get the default outlet too: the scheduler reads it from the partial kwargs."""
        from airflow.sdk.bases.operator import partial

        waits = kwargs.get("wait_for_completion", True)
        kwargs = _with_default_outlets(task_id, kwargs, kwargs.get("output_alias"), waits)
        return partial(cls, task_id=task_id, **kwargs)

    def __init__(
        self,
        *,
        pipeline: str,
        input_uri: str,
        output_uri: str,
        partitions: int | str = 1,
        concurrency: int | str = 64,
        overrides: dict[str, Any] | None = None,
        ray_conn_id: str = MatrixRayHook.default_conn_name,
        cluster: dict[str, Any] | None = None,
        runtime_env: dict[str, Any] | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        wait_for_completion: bool = True,
        force_rerun: bool = False,
        poll_interval: float = 5.0,
        outage_budget_s: float = 900.0,
        overwrite: bool = False,
        output_alias: str | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
        entrypoint_memory: int | None = None,
        entrypoint_resources: dict[str, float] | None = None,
        matrix_command: str = "matrix",
        cancel_on_kill: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs = _with_default_outlets(kwargs["task_id"], kwargs, output_alias, wait_for_completion)
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.input_uri = input_uri
        self.output_uri = output_uri
        self.partitions = partitions
        self.concurrency = concurrency
        self.overrides = overrides or {}
        self.ray_conn_id = ray_conn_id
        self.cluster = cluster
        self.runtime_env = runtime_env
        self.deferrable = deferrable
        self.wait_for_completion = wait_for_completion
        self.force_rerun = force_rerun
        self.poll_interval = poll_interval
        self.outage_budget_s = outage_budget_s
        self.overwrite = overwrite
        self.output_alias = output_alias
        self.placement = {
            k: v
            for k, v in zip(
                _PLACEMENT,
                (entrypoint_num_cpus, entrypoint_num_gpus, entrypoint_memory, entrypoint_resources),
                strict=True,
            )
            if v is not None
        }
        self.matrix_command = matrix_command
        self.cancel_on_kill = cancel_on_kill
        self._submission_id: str | None = None

    # -- checks and submission ------------------------------------------------------------------
    def _check_arguments(self) -> None:
        require_text(self, ("pipeline", "input_uri", "output_uri", "ray_conn_id"))
        if not self.pipeline.endswith((".yaml", ".yml")) and self.pipeline not in shipped_pipelines():
            raise AirflowException(
                f"unknown pipeline {self.pipeline!r}: use one of {', '.join(shipped_pipelines())} "
                "or the path of a spec YAML on the cluster"
            )
        whole_numbers(self, ("partitions", "concurrency"))
        self.placement = _numeric_placement(self.placement)

    def entrypoint(self) -> str:
        args = [
            self.matrix_command,
            "run",
            self.pipeline,
            "--input",
            self.input_uri,
            "--output",
            self.output_uri,
            "--partitions",
            str(self.partitions),
            "--concurrency",
            str(self.concurrency),
            "--manifest-json",
        ]
        if self.overwrite:
            args.append("--overwrite")
        args += [f"{k}={v}" for k, v in self.overrides.items()]
        return job_entrypoint(args)

    def work_hash(self, try_number: int) -> str:
        """What the job does; any change in it names a new Ray job (so a clear reruns)."""
        work = {
            "entrypoint": self.entrypoint(),
            "runtime_env": self.runtime_env,
            "placement": self.placement,
            "provider": __version__,
            "try": try_number if self.force_rerun else None,
        }
        return hashlib.sha256(json.dumps(work, sort_keys=True, default=str).encode()).hexdigest()

    def submission_id_of(self, context: Any) -> str:
        """The first submission id this task instance uses for its current work."""
        ti = context["ti"]
        work = self.work_hash(getattr(ti, "try_number", 0))
        return submission_id_for(ti.dag_id, ti.task_id, ti.run_id, getattr(ti, "map_index", -1), work)

    def submit_or_attach(self, hook: MatrixRayHook, context: Any) -> tuple[str, dict[str, Any] | None]:
        """(submission id, existing job or None when we just submitted)."""
        ti = context["ti"]
        base = self.submission_id_of(context)
        for attempt in range(_MAX_RESUBMITS):
            submission_id = base if attempt == 0 else f"{base}-r{attempt}"
            job = hook.get_job(submission_id)
            if job is None:
                if attempt == 0 and int(getattr(ti, "try_number", 1) or 1) > 1:  # a first try has no older job
                    self._stop_superseded(hook, ti, submission_id)
                metadata = {**_owner(ti), "matrix_work_hash": self.work_hash(getattr(ti, "try_number", 0))[:16]}
                hook.submit(self.entrypoint(), submission_id, self.runtime_env, metadata, self.placement)
                self.log.info("submitted Ray job %s", submission_id)
                return submission_id, None
            if job["status"] in ACTIVE:
                self.log.info("re-attached to running Ray job %s", submission_id)
                return submission_id, job
            if job["status"] == "SUCCEEDED":
                self.log.info("Ray job %s already succeeded (same work); force_rerun=True runs it again", submission_id)
                return submission_id, job
            self.log.info("Ray job %s ended %s; submitting again", submission_id, job["status"])
        raise AirflowException(f"{_MAX_RESUBMITS} failed submissions of {base}; giving up")

    def _stop_superseded(self, hook: MatrixRayHook, ti: Any, new_id: str) -> None:
        """New work for this task instance: stop its jobs still running older work (a retry after the
        work changed, force_rerun, a clear mid-run), or the two would race for the same output."""
        mine = {"airflow_deployment": "", **_owner(ti)}
        for job in hook.list_jobs():
            meta = {"airflow_deployment": "", **(job.get("metadata") or {})}
            if job.get("status") in ACTIVE and job.get("submission_id") != new_id and mine.items() <= meta.items():
                self.log.warning("stopping Ray job %s, superseded by %s (new work)", job["submission_id"], new_id)
                hook.stop(job["submission_id"])

    # -- execution ------------------------------------------------------------------------------
    def execute(self, context: Any) -> dict[str, Any]:
        self._check_arguments()
        hook = MatrixRayHook(self.ray_conn_id, cluster=self.cluster)
        try:
            hook.version()
            submission_id, job = self.submit_or_attach(hook, context)
        except RayJobsError as exc:
            raise AirflowException(str(exc)) from None
        self._submission_id = submission_id
        endpoint = hook.endpoint()
        context["ti"].xcom_push(key=RAY_JOB_URL_KEY, value=ray_job_url(endpoint.dashboard_url, submission_id))
        context["ti"].xcom_push(key=GRAFANA_URL_KEY, value=grafana_url(endpoint.grafana_url, submission_id))
        context["ti"].xcom_push(key=CONN_ID_KEY, value=self.ray_conn_id)
        if self.cluster:  # the UI shows such a job with its Ray link only: it needs just the name
            context["ti"].xcom_push(key=CLUSTER_KEY, value=self.cluster.get("name") or "unnamed")
        if not self.wait_for_completion:
            return {"ray_submission_id": submission_id, "status": (job or {}).get("status", "PENDING")}
        if job is not None and job["status"] == "SUCCEEDED":
            return self._finish(hook, submission_id, context)
        deadline = time.time() + self.execution_timeout.total_seconds() if self.execution_timeout else None
        if self.deferrable:
            self.defer(trigger=self._trigger(submission_id, deadline), method_name="execute_complete")
        return self._poll(submission_id, context, deadline)

    def _poll(self, submission_id: str, context: Any, deadline: float | None) -> dict[str, Any]:
        """Waits in the worker with the trigger's own loop: one wait loop, whichever process waits."""
        event = asyncio.run(first_event(self._trigger(submission_id, deadline)))
        return self.execute_complete(context, event)

    def _trigger(self, submission_id: str, deadline: float | None) -> MatrixRayJobTrigger:
        return MatrixRayJobTrigger(
            submission_id,
            self.ray_conn_id,
            self.poll_interval,
            deadline=deadline,
            outage_budget_s=self.outage_budget_s,
            cluster=self.cluster,
            cancel_on_kill=self.cancel_on_kill,
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Runs on a fresh operator instance: everything it needs is in the event."""
        hook = MatrixRayHook(self.ray_conn_id, cluster=self.cluster)
        submission_id = event["submission_id"]
        self._submission_id = submission_id
        if event["status"] == "ERROR" and not will_retry(context):
            self._stop_quietly(hook, submission_id)
        if event["status"] != "SUCCEEDED":
            raise AirflowException(failure_message(hook, event))
        return self._finish(hook, submission_id, context)

    def _finish(self, hook: MatrixRayHook, submission_id: str, context: Any) -> dict[str, Any]:
        manifest = {**manifest_of(hook, submission_id, self.output_uri), "ray_submission_id": submission_id}
        extra = outlet_extra(manifest, submission_id)
        for outlet in self.outlets:
            if isinstance(outlet, Asset):
                context["outlet_events"][outlet].extra = extra
            elif isinstance(outlet, AssetAlias):
                context["outlet_events"][outlet].add(Asset(uri=_asset_uri(manifest.get("output") or "")), extra=extra)
        return manifest

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: input_uri -> output_uri (rendered), for lineage across DAGs."""
        return lineage_for(self.input_uri, self.output_uri)

    def _stop_quietly(self, hook: MatrixRayHook, submission_id: str) -> None:
        """Last try and we lost sight of the job: stop it rather than leave it burning GPUs."""
        try:
            self.log.warning("no retry left: stopping Ray job %s (stopped=%s)", submission_id, hook.stop(submission_id))
        except RayJobsError as exc:
            self.log.error("could not stop Ray job %s; stop it by hand: %s", submission_id, exc)

    def on_kill(self) -> None:
        """Killed while waiting in the worker (deferrable=False): stop the Ray job too, unless
        `cancel_on_kill=False` (a worker evicted by SIGTERM then leaves a job a retry re-attaches to)."""
        if self._submission_id and self.cancel_on_kill:
            MatrixRayHook(self.ray_conn_id, cluster=self.cluster).stop(self._submission_id)
            self.log.info("stopped Ray job %s", self._submission_id)


def _numeric_placement(placement: dict[str, Any]) -> dict[str, Any]:
    """Rendered templates are strings: the Jobs API wants numbers for the driver's resources."""

    def number(key: str, value: Any) -> Any:
        if isinstance(value, dict):  # entrypoint_resources
            return {name: float(amount) for name, amount in value.items()}
        return int(value) if key == "entrypoint_memory" else float(value)

    try:
        return {key: number(key, value) for key, value in placement.items()}
    except (TypeError, ValueError, AttributeError):
        raise AirflowException(f"driver placement must be numbers, got {placement!r}") from None


def job_entrypoint(args: list[str]) -> str:
    """The Ray job's shell command. A fresh working dir: one beside Ray's temp folder would import it as `ray`."""
    return 'cd "$(mktemp -d)" && exec ' + shlex.join(args)


def require_text(operator: BaseOperator, names: Sequence[str]) -> None:
    """Rendered string arguments must not be empty."""
    for name in names:
        value = getattr(operator, name)
        if not isinstance(value, str) or not value.strip():
            raise AirflowException(
                f"{name} rendered to an empty value ({value!r}); check its template and the variables it uses"
            )


def whole_numbers(operator: BaseOperator, names: Sequence[str]) -> None:
    """Rendered count arguments become ints of at least 1; None (left to the command's default) stays."""
    for name in names:
        value = getattr(operator, name)
        if value is None:
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise AirflowException(f"{name} must be a whole number, got {value!r}") from None
        if number < 1:
            raise AirflowException(f"{name} must be at least 1, got {number}")
        setattr(operator, name, number)


def _asset_uri(output: str) -> str:
    output = output.rstrip("/")
    return output if "://" in output else "file://" + output
