"""Extra links on a MatrixPipelineOperator task: its Ray job page and its Grafana dashboard.

The operator pushes both URLs to XCom when it submits, so the links work on the finished task too.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.common.compat.sdk import XCom
from airflow.sdk import BaseOperatorLink

RAY_JOB_URL_KEY = "matrix_ray_job_url"
GRAFANA_URL_KEY = "matrix_grafana_url"
# The rendered `ray_conn_id`: the UI asks Ray about a running job through the task's own connection.
CONN_ID_KEY = "matrix_ray_conn_id"
# The name of the cluster its DAG run brought up (`cluster=`): the UI then asks no connection about it.
CLUSTER_KEY = "matrix_ray_cluster"


class _XComLink(BaseOperatorLink):
    xcom_key = ""

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return XCom.get_value(key=self.xcom_key, ti_key=ti_key) or ""


class RayJobLink(_XComLink):
    name = "Ray job"
    xcom_key = RAY_JOB_URL_KEY


class GrafanaLink(_XComLink):
    name = "Grafana"
    xcom_key = GRAFANA_URL_KEY


def ray_job_url(dashboard_url: str, submission_id: str) -> str:
    return f"{dashboard_url}/#/jobs/{submission_id}"


def grafana_url(grafana_base: str | None, submission_id: str) -> str | None:
    if not grafana_base:
        return None
    return f"{grafana_base.rstrip('/')}/d/matrix-pipeline/matrix?var-job={submission_id}"
