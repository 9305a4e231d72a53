"""MatrixRayJobSensor: wait for a Ray job that another task submitted (fire-and-forget pattern).

`MatrixPipelineOperator(wait_for_completion=False)` returns `{"ray_submission_id": …}` as soon as
Ray accepts the job; this sensor waits for it, in the triggerer when deferrable, and returns the
run's manifest. A FAILED or STOPPED job fails the sensor with the job's own error line.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.providers.common.compat.sdk import BaseSensorOperator, PokeReturnValue, conf

from matrix_provider.hooks.ray_jobs import TERMINAL, MatrixRayHook, RayUnavailable
from matrix_provider.operators.outcome import AirflowException, failure_message, manifest_of
from matrix_provider.triggers.ray_job import MatrixRayJobTrigger


class MatrixRayJobSensor(BaseSensorOperator):
    """Succeeds with the manifest when the Ray job `submission_id` SUCCEEDED; fails when it did not.

    :param submission_id: the Ray submission id, usually
        ``"{{ ti.xcom_pull(task_ids='submit')['ray_submission_id'] }}"``. Templated.
    :param ray_conn_id: connection of type ``matrix_ray``. Templated.
    :param cluster: instead of the connection, the cluster a setup task brought up for this DAG run
        (``MatrixSlurmClusterOperator(...).output``). Templated.
    :param output_uri: where the run writes; its `_manifest.json` answers if Ray's log cannot. Templated.
    :param deferrable: wait in the triggerer (default: ``[operators] default_deferrable``).
    :param outage_budget_s: how long a dashboard outage is waited out while deferred.
    """

    template_fields: Sequence[str] = ("submission_id", "ray_conn_id", "cluster", "output_uri")
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        submission_id: str,
        ray_conn_id: str = MatrixRayHook.default_conn_name,
        cluster: dict[str, Any] | None = None,
        output_uri: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        outage_budget_s: float = 900.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.submission_id = submission_id
        self.ray_conn_id = ray_conn_id
        self.cluster = cluster
        self.output_uri = output_uri
        self.deferrable = deferrable
        self.outage_budget_s = outage_budget_s

    def poke(self, context: Any) -> PokeReturnValue | bool:
        hook = MatrixRayHook(self.ray_conn_id, cluster=self.cluster)
        try:
            job = hook.get_job(self.submission_id)
        except RayUnavailable as exc:
            self.log.warning("%s; poking again", exc)
            return False
        if job is None:
            raise AirflowException(f"Ray job {self.submission_id!r} does not exist on the cluster")
        if job["status"] not in TERMINAL:
            return False
        return PokeReturnValue(True, self._outcome(hook, job["status"], job.get("message") or ""))

    def _outcome(self, hook: MatrixRayHook, status: str, message: str) -> dict[str, Any]:
        if status != "SUCCEEDED":
            event = {"status": status, "submission_id": self.submission_id, "message": message}
            raise AirflowException(failure_message(hook, event))
        return manifest_of(hook, self.submission_id, self.output_uri)

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            return super().execute(context)
        done = self.poke(context)
        if isinstance(done, PokeReturnValue):
            return done.xcom_value
        self.defer(
            trigger=MatrixRayJobTrigger(
                self.submission_id,
                self.ray_conn_id,
                self.poke_interval,
                outage_budget_s=self.outage_budget_s,
                stream_progress=False,
                cluster=self.cluster,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout) if self.timeout else None,
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        hook = MatrixRayHook(self.ray_conn_id, cluster=self.cluster)
        return self._outcome(hook, event["status"], event.get("message") or "")
