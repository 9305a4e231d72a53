"""MatrixStopJobOperator: stop a Ray job by submission id and wait until Ray says it ended.

For DAGs that submit fire-and-forget (`wait_for_completion=False`) and need a way to cancel, and
for teardown tasks that must not leave a job burning GPUs after its DAG run failed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from matrix_provider.hooks.ray_jobs import TERMINAL, MatrixRayHook, RayJobsError
from matrix_provider.operators.outcome import AirflowException


class MatrixStopJobOperator(BaseOperator):
    """Stop `submission_id`; returns the job's final status (a job already ended is left as it is).

    :param submission_id: the Ray submission id. Templated.
    :param ray_conn_id: connection of type ``matrix_ray``. Templated.
    :param cluster: instead of the connection, the cluster a setup task brought up for this DAG run
        (``MatrixSlurmClusterOperator(...).output``). Templated.
    :param wait_s: how long to wait for Ray to report the job ended.
    :param missing_ok: succeed when the job does not exist (e.g. in a teardown after a failed submit).
    """

    template_fields: Sequence[str] = ("submission_id", "ray_conn_id", "cluster")
    ui_color = "#fde8e8"

    def __init__(
        self,
        *,
        submission_id: str,
        ray_conn_id: str = MatrixRayHook.default_conn_name,
        cluster: dict[str, Any] | None = None,
        wait_s: float = 120.0,
        missing_ok: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.submission_id = submission_id
        self.ray_conn_id = ray_conn_id
        self.cluster = cluster
        self.wait_s = wait_s
        self.missing_ok = missing_ok

    def execute(self, context: Any) -> str:
        hook = MatrixRayHook(self.ray_conn_id, cluster=self.cluster)
        try:
            return self._stop(hook)
        except RayJobsError as exc:
            raise AirflowException(str(exc)) from None

    def _stop(self, hook: MatrixRayHook) -> str:
        job = hook.get_job(self.submission_id)
        if job is None:
            if self.missing_ok:
                self.log.info("Ray job %s does not exist; nothing to stop", self.submission_id)
                return "MISSING"
            raise AirflowException(f"Ray job {self.submission_id!r} does not exist on the cluster")
        if job["status"] in TERMINAL:
            self.log.info("Ray job %s already ended %s", self.submission_id, job["status"])
            return job["status"]
        self.log.info("stopping Ray job %s (stopped=%s)", self.submission_id, hook.stop(self.submission_id))
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            job = hook.get_job(self.submission_id) or {"status": "MISSING"}
            if job["status"] in TERMINAL | {"MISSING"}:
                return job["status"]
            time.sleep(2)
        raise AirflowException(f"Ray job {self.submission_id} still {job['status']} {self.wait_s:.0f}s after stop")
