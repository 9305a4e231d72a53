"""MatrixPipelineOperator: run a matrix pipeline as a Ray job, deferrable, re-attaching, killable.

Flow (the shape of Airflow's Databricks operators): render and check the arguments, then submit
the job under a submission id derived from dag, task, run and map index. A retry or a restarted
worker finds that id on the cluster and re-attaches to a running job, or returns at once if it
already succeeded; only after a failure does it submit again (as `<id>-r1`, `-r2`, …), and the
sink's resume makes that cheap. Then defer to MatrixRayJobTrigger (or poll in the worker when
`deferrable=False`). The XCom value is the run's manifest, and each outlet Asset event carries
the manifest counts.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import Asset, BaseOperator

from matrix_provider.hooks.ray_jobs import ACTIVE, TERMINAL, MatrixRayHook
from matrix_provider.links.ray import (
    GRAFANA_URL_KEY,
    RAY_JOB_URL_KEY,
    GrafanaLink,
    RayJobLink,
    grafana_url,
    ray_job_url,
)
from matrix_provider.protocol import MANIFEST_FIGURES, PROGRESS_PREFIX, error_text, parse_manifest, shipped_pipelines
from matrix_provider.triggers.ray_job import MatrixRayJobTrigger

try:
    from airflow.sdk.exceptions import AirflowException
except ImportError:  # pragma: no cover - older layouts
    from airflow.exceptions import AirflowException

_MAX_RESUBMITS = 1000


def submission_id_for(dag_id: str, task_id: str, run_id: str, map_index: int) -> str:
    """Deterministic and Ray-safe: the same task instance always names the same job."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{dag_id}-{task_id}".lower()).strip("-")[:60]
    digest = hashlib.sha256(f"{dag_id}|{task_id}|{run_id}|{map_index}".encode()).hexdigest()[:12]
    return f"matrix-{slug}-{digest}"


class MatrixPipelineOperator(BaseOperator):
    """Run a matrix pipeline over `input_uri` into `output_uri` as a Ray job.

    :param pipeline: shipped pipeline name (e.g. ``natural_reasoning``) or a YAML path on the cluster.
    :param input_uri: file, folder or glob; local to the cluster or ``s3://``. Templated.
    :param output_uri: output folder; rerunning on it resumes. Templated.
    :param partitions: data-parallel partition drivers.
    :param concurrency: rows in flight per partition.
    :param overrides: Hydra overrides, e.g. ``{"llm": "sim", "roles.score.replicas": 4}``. Templated.
    :param ray_conn_id: connection of type ``matrix_ray`` (Ray dashboard host/port, token as password).
    :param runtime_env: Ray runtime_env for the job (e.g. ``{"pip": [...]}``); never put secrets here.
    :param deferrable: wait in the triggerer (default) instead of holding a worker slot.
    :param poll_interval: seconds between status checks.
    :param overwrite: replace an output written by a different config.
    :param matrix_command: the `matrix` executable on the cluster.
    """

    template_fields: Sequence[str] = ("pipeline", "input_uri", "output_uri", "overrides")
    template_fields_renderers = {"overrides": "json"}
    operator_extra_links = (RayJobLink(), GrafanaLink())
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        pipeline: str,
        input_uri: str,
        output_uri: str,
        partitions: int = 1,
        concurrency: int = 64,
        overrides: dict[str, Any] | None = None,
        ray_conn_id: str = MatrixRayHook.default_conn_name,
        runtime_env: dict[str, Any] | None = None,
        deferrable: bool = True,
        poll_interval: float = 5.0,
        overwrite: bool = False,
        matrix_command: str = "matrix",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("outlets", [Asset(name=f"matrix-{kwargs['task_id']}", uri=f"matrix://{kwargs['task_id']}")])
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.input_uri = input_uri
        self.output_uri = output_uri
        self.partitions = partitions
        self.concurrency = concurrency
        self.overrides = overrides or {}
        self.ray_conn_id = ray_conn_id
        self.runtime_env = runtime_env
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.overwrite = overwrite
        self.matrix_command = matrix_command
        self._submission_id: str | None = None

    # -- checks and submission ------------------------------------------------------------------
    def _check_arguments(self) -> None:
        for name in ("pipeline", "input_uri", "output_uri"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise AirflowException(
                    f"{name} rendered to an empty value ({value!r}); check its template and the variables it uses"
                )
        if not self.pipeline.endswith((".yaml", ".yml")) and self.pipeline not in shipped_pipelines():
            raise AirflowException(
                f"unknown pipeline {self.pipeline!r}: use one of {', '.join(shipped_pipelines())} "
                "or the path of a spec YAML on the cluster"
            )
        if self.partitions < 1 or self.concurrency < 1:
            raise AirflowException("partitions and concurrency must be at least 1")

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
        # A fresh working dir: a job started beside Ray's temp folder would import it as `ray`.
        return 'cd "$(mktemp -d)" && exec ' + shlex.join(args)

    def submit_or_attach(self, hook: MatrixRayHook, context: Any) -> tuple[str, dict[str, Any] | None]:
        """(submission id, existing job or None when we just submitted)."""
        ti = context["ti"]
        base = submission_id_for(ti.dag_id, ti.task_id, ti.run_id, getattr(ti, "map_index", -1))
        for attempt in range(_MAX_RESUBMITS):
            submission_id = base if attempt == 0 else f"{base}-r{attempt}"
            job = hook.get_job(submission_id)
            if job is None:
                metadata = {"airflow_dag_id": ti.dag_id, "airflow_task_id": ti.task_id, "airflow_run_id": ti.run_id}
                hook.submit(self.entrypoint(), submission_id, self.runtime_env, metadata)
                self.log.info("submitted Ray job %s", submission_id)
                return submission_id, None
            if job["status"] in ACTIVE:
                self.log.info("re-attached to running Ray job %s", submission_id)
                return submission_id, job
            if job["status"] == "SUCCEEDED":
                self.log.info("Ray job %s already succeeded", submission_id)
                return submission_id, job
            self.log.info("Ray job %s ended %s; submitting again", submission_id, job["status"])
        raise AirflowException(f"{_MAX_RESUBMITS} failed submissions of {base}; giving up")

    # -- execution ------------------------------------------------------------------------------
    def execute(self, context: Any) -> dict[str, Any]:
        self._check_arguments()
        hook = MatrixRayHook(self.ray_conn_id)
        try:
            hook.check()
            submission_id, job = self.submit_or_attach(hook, context)
        except RuntimeError as exc:
            raise AirflowException(str(exc)) from None
        self._submission_id = submission_id
        endpoint = hook.endpoint()
        context["ti"].xcom_push(key=RAY_JOB_URL_KEY, value=ray_job_url(endpoint.dashboard_url, submission_id))
        context["ti"].xcom_push(key=GRAFANA_URL_KEY, value=grafana_url(endpoint.grafana_url, submission_id))
        if job is not None and job["status"] == "SUCCEEDED":
            return self._finish(hook, submission_id, context)
        deadline = time.time() + self.execution_timeout.total_seconds() if self.execution_timeout else None
        if self.deferrable:
            self.defer(
                trigger=MatrixRayJobTrigger(submission_id, self.ray_conn_id, self.poll_interval, deadline=deadline),
                method_name="execute_complete",
            )
        return self._poll(hook, submission_id, context, deadline)

    def _poll(self, hook: MatrixRayHook, submission_id: str, context: Any, deadline: float | None) -> dict[str, Any]:
        offset = 0
        while True:
            job = hook.get_job(submission_id)
            logs = hook.get_logs(submission_id)
            for line in logs[offset:].splitlines():
                if line.startswith(PROGRESS_PREFIX):
                    self.log.info("%s", line)
            offset = len(logs)
            if job is None or job["status"] in TERMINAL:
                status = job["status"] if job else "MISSING"
                return self.execute_complete(
                    context,
                    {"status": status, "submission_id": submission_id, "message": (job or {}).get("message", "")},
                )
            if deadline is not None and time.time() > deadline:
                hook.stop(submission_id)
                raise AirflowException(f"execution_timeout reached: stopped Ray job {submission_id}")
            time.sleep(self.poll_interval)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Runs on a fresh operator instance: everything it needs is in the event."""
        hook = MatrixRayHook(self.ray_conn_id)
        submission_id = event["submission_id"]
        if event["status"] != "SUCCEEDED":
            logs = hook.get_logs(submission_id) if event["status"] in ("FAILED", "STOPPED") else ""
            detail = error_text(logs) if logs else ""
            raise AirflowException(
                f"Ray job {submission_id} {event['status']}: {event.get('message') or ''}\n{detail}".strip()
            )
        return self._finish(hook, submission_id, context)

    def _finish(self, hook: MatrixRayHook, submission_id: str, context: Any) -> dict[str, Any]:
        manifest = parse_manifest(hook.get_logs(submission_id))
        if manifest is None:
            raise AirflowException(f"Ray job {submission_id} succeeded but printed no manifest line")
        extra = {k: manifest.get(k) for k in MANIFEST_FIGURES} | {
            "output": manifest.get("output"),
            "ray_submission_id": submission_id,
        }
        for outlet in self.outlets:
            if isinstance(outlet, Asset):
                context["outlet_events"][outlet].extra = extra
        return manifest

    def on_kill(self) -> None:
        """Killed while polling in the worker (deferrable=False): stop the Ray job too."""
        if self._submission_id:
            MatrixRayHook(self.ray_conn_id).stop(self._submission_id)
            self.log.info("stopped Ray job %s", self._submission_id)
