"""The Matrix view in the Airflow UI: job state, progress and token throughput per task instance.

A FastAPI app mounted in Airflow's API server at /matrix: `/matrix/` lists recent pipeline runs,
and `/matrix/ti/{dag_id}/{run_id}/{task_id}/{map_index}` shows one task instance (embedded in the
task-instance page as an external view). Finished runs show their manifest (from XCom); running
ones show the Ray job's state and its latest progress line. Every row links to Ray and Grafana.
"""

from __future__ import annotations

import html
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from matrix_provider.hooks.ray_jobs import MatrixRayHook, RayJobsError
from matrix_provider.links.ray import GRAFANA_URL_KEY, RAY_JOB_URL_KEY
from matrix_provider.protocol import MANIFEST_FIGURES, parse_progress

app = FastAPI(title="Matrix runs")
_STYLE = """body{font-family:system-ui,sans-serif;margin:16px;color:#1f2933}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #cbd2d9;padding:4px 10px;text-align:right}
th{background:#f0f4f8}td.l,th.l{text-align:left}.ok{color:#1b7f3b}.bad{color:#b42318}a{color:#1a56db}"""


def _xcoms(key: str, limit: int = 200, **where: Any) -> list[Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(XComModel).where(XComModel.key == key)
        for column, value in where.items():
            query = query.where(getattr(XComModel, column) == value)
        rows = session.scalars(query.order_by(XComModel.timestamp.desc()).limit(limit)).all()
        return [(r.dag_id, r.run_id, r.task_id, r.map_index, XComModel.deserialize_value(r)) for r in rows]


def _value(key: str, dag_id: str, run_id: str, task_id: str, map_index: int) -> Any:
    rows = _xcoms(key, 1, dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index)
    return rows[0][4] if rows else None


def _live(job_url: str) -> dict[str, Any]:
    """State and latest progress of a running job, straight from Ray (short timeout: a page must load)."""
    submission_id = job_url.rsplit("/", 1)[-1]
    hook = MatrixRayHook(timeout_s=3.0)
    try:
        job = hook.get_job(submission_id) or {}
        progress = {}
        for line in reversed(hook.get_logs(submission_id).splitlines()):
            if parsed := parse_progress(line):
                progress = parsed
                break
        return {"state": job.get("status", "unknown"), **progress}
    except (RayJobsError, OSError) as exc:
        return {"state": f"unknown ({type(exc).__name__})"}


def _run_view(dag_id: str, run_id: str, task_id: str, map_index: int, job_url: str) -> dict[str, Any]:
    manifest = _value("return_value", dag_id, run_id, task_id, map_index)
    view: dict[str, Any] = {
        "dag_id": dag_id,
        "run_id": run_id,
        "task_id": task_id,
        "map_index": map_index,
        "ray": job_url,
        "grafana": _value(GRAFANA_URL_KEY, dag_id, run_id, task_id, map_index),
    }
    if isinstance(manifest, dict):
        view |= {"state": "SUCCEEDED", **{k: manifest.get(k) for k in MANIFEST_FIGURES}}
    else:
        live = _live(job_url)
        view |= {
            "state": live.pop("state"),
            "rows_done": live.get("rows_done"),
            "in_flight": live.get("in_flight"),
            "rows_error": live.get("errors"),
            "tokens_per_s": live.get("tokens_per_s"),
        }
    return view


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape("" if value is None else str(value))


def _page(title: str, views: list[dict[str, Any]]) -> HTMLResponse:
    columns = [
        "dag_id",
        "run_id",
        "task_id",
        "state",
        "rows_in",
        "rows_ok",
        "rows_filtered",
        "rows_error",
        "rows_resumed",
        "rows_done",
        "in_flight",
        "tokens_per_s",
        "wall_seconds",
    ]
    head = "".join(
        f'<th class="{"l" if c in ("dag_id", "run_id", "task_id", "state") else ""}">{c}</th>' for c in columns
    )
    body = []
    for v in views:
        cells = []
        for c in columns:
            css = "l" if c in ("dag_id", "run_id", "task_id", "state") else ""
            if c == "state":
                css += " ok" if v["state"] == "SUCCEEDED" else (" bad" if v["state"] in ("FAILED", "STOPPED") else "")
            cells.append(f'<td class="{css}">{_cell(v.get(c))}</td>')
        links = f'<a href="{html.escape(v["ray"])}" target="_blank">Ray job</a>'
        if v.get("grafana"):
            links += f' · <a href="{html.escape(v["grafana"])}" target="_blank">Grafana</a>'
        body.append(f"<tr>{''.join(cells)}<td class='l'>{links}</td></tr>")
    rows = "".join(body) or f"<tr><td class='l' colspan='{len(columns) + 1}'>no matrix runs yet</td></tr>"
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h2>{html.escape(title)}</h2>"
        f"<table><tr>{head}<th class='l'>links</th></tr>{rows}</table></body></html>"
    )


@app.get("/", response_class=HTMLResponse)
def runs() -> HTMLResponse:
    views = [_run_view(d, r, t, m, url) for d, r, t, m, url in _xcoms(RAY_JOB_URL_KEY, 50)]
    return _page("Matrix pipeline runs", views)


@app.get("/ti/{dag_id}/{run_id}/{task_id}/{map_index}", response_class=HTMLResponse)
def task_instance(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> HTMLResponse:
    url = _value(RAY_JOB_URL_KEY, dag_id, run_id, task_id, map_index)
    views = [_run_view(dag_id, run_id, task_id, map_index, url)] if url else []
    return _page(f"Matrix: {dag_id} / {task_id}", views)


class MatrixPlugin(AirflowPlugin):
    name = "matrix"
    fastapi_apps = [{"app": app, "url_prefix": "/matrix", "name": "Matrix runs"}]
    external_views = [
        {"name": "Matrix runs", "href": "/matrix/", "destination": "nav", "url_route": "matrix"},
        {
            "name": "Matrix",
            "href": "/matrix/ti/{DAG_ID}/{RUN_ID}/{TASK_ID}/{MAP_INDEX}",
            "destination": "task_instance",
            "url_route": "matrix-ti",
        },
    ]
