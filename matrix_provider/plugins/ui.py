"""The Matrix view in the Airflow UI: job state, progress and token throughput per task instance.

A FastAPI app mounted in Airflow's API server at /matrix: `/matrix/` lists recent pipeline runs
of the DAGs the user may read, and `/matrix/ti/{dag_id}/{run_id}/{task_id}/{map_index}` shows one
task instance (embedded in the task-instance page as an external view). Requests authenticate
as the core API's do (the UI's `_token` cookie or a bearer token) and are checked by the auth
manager per DAG: 401 without credentials, 403 for a DAG the user may not read.

The page costs one XCom query. Finished runs show their manifest (from XCom); running ones ask
Ray through the task's own connection (a job on its DAG run's own cluster is shown with its
Ray link only), in a bounded thread pool with a 3 s budget per page and results cached for 10 s,
so a slow or dead dashboard never holds a request. Connections are looked up again after a
minute: a rotated token is used without restarting the API server.
"""

from __future__ import annotations

import html
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from threading import Lock
from typing import Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse

from matrix_provider.hooks.ray_jobs import MatrixRayHook
from matrix_provider.links.ray import CLUSTER_KEY, CONN_ID_KEY, GRAFANA_URL_KEY, RAY_JOB_URL_KEY
from matrix_provider.protocol import MANIFEST_FIGURES, parse_progress

app = FastAPI(title="Matrix runs")
_KEYS = (RAY_JOB_URL_KEY, GRAFANA_URL_KEY, CONN_ID_KEY, CLUSTER_KEY, "return_value")
_PAGE_ROWS = 50
_LIVE_BUDGET_S = 3.0
_LIVE_TTL_S = 10.0
_CONN_TTL_S = 60.0
# Where a running job is asked about: a connection id, or _OWN_CLUSTER (not asked: see _live).
_OWN_CLUSTER = object()
Source = str | object
_STYLE = """body{font-family:system-ui,sans-serif;margin:16px;color:#1f2933}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #cbd2d9;padding:4px 10px;text-align:right}
th{background:#f0f4f8}td.l,th.l{text-align:left}.ok{color:#1b7f3b}.bad{color:#b42318}a{color:#1a56db}"""
_COLUMNS = (
    "dag_id",
    "run_id",
    "task_id",
    "map_index",
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
)
_TEXT = frozenset({"dag_id", "run_id", "task_id", "state"})
TiKey = tuple[str, str, str, int]


# -- data ---------------------------------------------------------------------------------------
def _task_xcoms(dag_ids: set[str] | None = None, ti: TiKey | None = None) -> dict[TiKey, dict[str, Any]]:
    """Our XComs of the newest matrix task instances, in one query: {ti: {key: value}}."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import and_, select

    x = XComModel
    newest = select(x.dag_id, x.run_id, x.task_id, x.map_index).where(x.key == RAY_JOB_URL_KEY)
    if dag_ids is not None:
        newest = newest.where(x.dag_id.in_(dag_ids))
    if ti is not None:
        newest = newest.where(x.dag_id == ti[0], x.run_id == ti[1], x.task_id == ti[2], x.map_index == ti[3])
    sub = newest.order_by(x.timestamp.desc()).limit(_PAGE_ROWS).subquery()
    query = (
        select(x)
        .join(
            sub,
            and_(
                x.dag_id == sub.c.dag_id,
                x.run_id == sub.c.run_id,
                x.task_id == sub.c.task_id,
                x.map_index == sub.c.map_index,
            ),
        )
        .where(x.key.in_(_KEYS))
        .order_by(x.timestamp.desc())
    )
    found: dict[TiKey, dict[str, Any]] = {}
    with create_session() as session:
        for row in session.scalars(query):
            found.setdefault((row.dag_id, row.run_id, row.task_id, row.map_index), {})[row.key] = (
                XComModel.deserialize_value(row)
            )
    return found


class _LiveCache:
    """Ray's view of running jobs: fetched in a small pool, kept for a few seconds, bounded in size.

    A fetch still running when a page's budget ends is not started again by the next page: it
    finishes in the background and caches its answer for whoever asks next.
    """

    def __init__(self, size: int = 512) -> None:
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="matrix-ui")
        self._items: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._inflight: dict[str, Future[dict[str, Any]]] = {}
        self._lock = Lock()
        self._size = size

    def get_many(self, jobs: dict[str, Source]) -> dict[str, dict[str, Any]]:
        """{submission id: live view} for {submission id: where to ask}; slow answers read 'unknown'."""
        now = time.monotonic()
        found: dict[str, dict[str, Any]] = {}
        pending: dict[str, Future[dict[str, Any]]] = {}
        with self._lock:
            for sid, source in jobs.items():
                if sid in self._items and now - self._items[sid][0] < _LIVE_TTL_S:
                    found[sid] = self._items[sid][1]
                elif sid in self._inflight:
                    pending[sid] = self._inflight[sid]
                else:
                    pending[sid] = self._inflight[sid] = self._pool.submit(_live, sid, source)
        for sid, future in pending.items():
            future.add_done_callback(lambda done, sid=sid: self._store(sid, done))
        wait(pending.values(), timeout=_LIVE_BUDGET_S)
        for sid, future in pending.items():
            found[sid] = future.result() if future.done() else {"state": "unknown (Ray slow to answer)"}
        return found

    def _store(self, sid: str, future: Future[dict[str, Any]]) -> None:
        with self._lock:
            self._inflight.pop(sid, None)
            self._items[sid] = (time.monotonic(), future.result())
            self._items.move_to_end(sid)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_connections: dict[str, tuple[float, Any]] = {}
_connections_lock = Lock()


def _connection(conn_id: str) -> Any:
    """The connection behind a conn id, kept a minute: a page must not look one up per row, and a
    rotated token must reach the page without an API server restart."""
    from airflow.models.connection import Connection

    now = time.monotonic()
    with _connections_lock:
        cached = _connections.get(conn_id)
    if cached and now - cached[0] < _CONN_TTL_S:
        return cached[1]
    conn = Connection.get_connection_from_secrets(conn_id)
    with _connections_lock:
        _connections[conn_id] = (now, conn)
    return conn


def _hook_for(conn_id: str) -> MatrixRayHook:
    hook = MatrixRayHook(conn_id, timeout_s=_LIVE_BUDGET_S, retry_s=0)
    conn = _connection(conn_id)
    if conn.conn_type != MatrixRayHook.conn_type:
        raise ValueError(f"connection {conn_id!r} is not of type matrix_ray")
    hook._endpoint = hook._endpoint_from(conn)
    return hook


def _live(submission_id: str, source: Source) -> dict[str, Any]:
    """State and latest progress of a running job, from Ray through the task's own connection.

    A job on a cluster its DAG run brought up is not asked about: its address and token file come
    from XCom, which a task writes, and the API server must not send a file it names to a URL it
    names. Its Ray link works."""
    if source is _OWN_CLUSTER:
        return {"state": "unknown (on its DAG run's own cluster: open its Ray link)"}
    try:
        hook = _hook_for(source)
    except ValueError as exc:
        return {"state": f"unknown ({exc})"}
    try:
        job = hook.get_job(submission_id) or {}
        progress = next(
            (
                p
                for line in reversed(hook.tail_logs(submission_id, 20, job.get("driver_node_id")).splitlines())
                if (p := parse_progress(line))
            ),
            {},
        )
        return {"state": job.get("status", "unknown"), **progress}
    except Exception as exc:  # Ray down, token refused, connection missing: the page still renders
        return {"state": f"unknown ({type(exc).__name__})"}


_LIVE = _LiveCache()


def _views(found: dict[TiKey, dict[str, Any]], user: Any) -> list[dict[str, Any]]:
    views, running = [], {}
    for (dag_id, run_id, task_id, map_index), values in found.items():
        job_url = values.get(RAY_JOB_URL_KEY) or ""
        view: dict[str, Any] = {
            "dag_id": dag_id,
            "run_id": run_id,
            "task_id": task_id,
            "map_index": map_index,
            "ray": job_url,
            "grafana": values.get(GRAFANA_URL_KEY),
        }
        manifest = values.get("return_value")
        if isinstance(manifest, dict) and "rows_in" in manifest:
            view |= {"state": "SUCCEEDED", **{k: manifest.get(k) for k in MANIFEST_FIGURES}}
        else:
            view["submission_id"] = job_url.rsplit("/", 1)[-1]
            running[view["submission_id"]] = _source(values)
        views.append(view)
    conns = {c for c in running.values() if isinstance(c, str)}
    readable = {c for c in conns if _may_read_connection(user, c)}
    allowed = {s: c for s, c in running.items() if not isinstance(c, str) or c in readable}
    live = _LIVE.get_many(allowed) if running else {}
    for view in views:
        if sid := view.pop("submission_id", None):
            now = live.get(sid, {"state": "unknown (no read access to its connection)"})
            view |= {
                "state": now.get("state", "unknown"),
                "rows_done": now.get("rows_done"),
                "in_flight": now.get("in_flight"),
                "rows_error": now.get("errors"),
                "tokens_per_s": now.get("tokens_per_s"),
            }
    return views


def _source(values: dict[str, Any]) -> Source:
    if values.get(CLUSTER_KEY):
        return _OWN_CLUSTER
    return values.get(CONN_ID_KEY) or MatrixRayHook.default_conn_name


def _may_read_connection(user: Any, conn_id: str) -> bool:
    """The page asks Ray with this connection's token only for users who may read the connection."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import ConnectionDetails

    return get_auth_manager().is_authorized_connection(
        method="GET", user=user, details=ConnectionDetails(conn_id=conn_id)
    )


def _link(url: Any, label: str) -> str:
    """Only http(s) links: a URL from XCom is data a task wrote, and `javascript:` would run here."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return ""
    return f'<a href="{html.escape(url)}" target="_blank" rel="noopener noreferrer">{label}</a>'


# -- page ---------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape("" if value is None else str(value))


def _row(view: dict[str, Any]) -> str:
    cells = []
    for column in _COLUMNS:
        css = "l" if column in _TEXT else ""
        if column == "state":
            state = view["state"]
            css += " ok" if state == "SUCCEEDED" else (" bad" if state in ("FAILED", "STOPPED") else "")
        cells.append(f'<td class="{css}">{_cell(view.get(column))}</td>')
    links = " · ".join(x for x in (_link(view["ray"], "Ray job"), _link(view.get("grafana"), "Grafana")) if x)
    return f"<tr>{''.join(cells)}<td class='l'>{links}</td></tr>"


def _page(title: str, views: list[dict[str, Any]]) -> HTMLResponse:
    head = "".join(f'<th class="{"l" if c in _TEXT else ""}">{c}</th>' for c in _COLUMNS)
    empty = f"<tr><td class='l' colspan='{len(_COLUMNS) + 1}'>no matrix runs yet</td></tr>"
    rows = "".join(_row(v) for v in views) or empty
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h2>{html.escape(title)}</h2>"
        f"<table><tr>{head}<th class='l'>links</th></tr>{rows}</table></body></html>"
    )


@app.get(
    "/",
    response_class=HTMLResponse,
    dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.XCOM))],
)
def runs(user: GetUserDep) -> HTMLResponse:
    """As the core API lists XComs: XCom access, and only the DAGs the user may read."""
    from airflow.api_fastapi.app import get_auth_manager

    readable = get_auth_manager().get_authorized_dag_ids(user=user, method="GET")
    return _page("Matrix pipeline runs", _views(_task_xcoms(dag_ids=readable), user))


@app.get(
    "/ti/{dag_id}/{run_id}/{task_id}/{map_index}",
    response_class=HTMLResponse,
    dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.XCOM))],
)
def task_instance(dag_id: str, run_id: str, task_id: str, map_index: str, user: GetUserDep) -> HTMLResponse:
    """`map_index` is "-1" or an index; the UI sends a literal `{MAP_INDEX}` for an unmapped task."""
    index = int(map_index) if map_index.lstrip("-").isdigit() else -1
    views = _views(_task_xcoms(ti=(dag_id, run_id, task_id, index)), user)
    return _page(f"Matrix: {dag_id} / {task_id}" + (f" [{index}]" if index >= 0 else ""), views)


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
