"""MatrixRayHook: the Ray Jobs REST API over HTTP, sync for workers and async for triggers.

The connection (type `matrix_ray`, default id `matrix_ray_default`) holds the dashboard's host
and port, the Ray auth token as its password, and extras: `tls` (https), `verify_tls`,
`dashboard_url` (public link for the UI), `grafana_url`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from airflow.sdk import BaseHook

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE = frozenset({"PENDING", "RUNNING"})


class RayJobsError(RuntimeError):
    """The Ray Jobs API cannot be used; the message names the cause and the fix."""


@dataclass(frozen=True)
class RayEndpoint:
    base_url: str
    token: str | None
    verify: bool
    dashboard_url: str
    grafana_url: str | None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class MatrixRayHook(BaseHook):
    conn_name_attr = "ray_conn_id"
    default_conn_name = "matrix_ray_default"
    conn_type = "matrix_ray"
    hook_name = "Matrix on Ray (Jobs API)"

    def __init__(self, ray_conn_id: str = default_conn_name, timeout_s: float = 30.0) -> None:
        super().__init__()
        self.ray_conn_id = ray_conn_id
        self.timeout_s = timeout_s
        self._endpoint: RayEndpoint | None = None

    # -- connection -----------------------------------------------------------------------------
    def _endpoint_from(self, conn: Any) -> RayEndpoint:
        extra = conn.extra_dejson or {}
        if not conn.host:
            raise RayJobsError(f"connection {self.ray_conn_id!r} has no host: set the Ray dashboard's host")
        scheme = "https" if extra.get("tls") or conn.schema == "https" else "http"
        base = f"{scheme}://{conn.host}:{conn.port or 8265}"
        return RayEndpoint(
            base_url=base,
            token=conn.password or None,
            verify=bool(extra.get("verify_tls", True)),
            dashboard_url=str(extra.get("dashboard_url") or base).rstrip("/"),
            grafana_url=extra.get("grafana_url"),
        )

    def endpoint(self) -> RayEndpoint:
        if self._endpoint is None:
            try:
                conn = self.get_connection(self.ray_conn_id)
            except Exception as exc:  # AirflowNotFoundException lives in different modules across versions
                raise RayJobsError(_missing(self.ray_conn_id, exc)) from None
            self._endpoint = self._endpoint_from(conn)
        return self._endpoint

    async def aendpoint(self) -> RayEndpoint:
        if self._endpoint is None:
            try:
                conn = await self.aget_connection(self.ray_conn_id)
            except Exception as exc:
                raise RayJobsError(_missing(self.ray_conn_id, exc)) from None
            self._endpoint = self._endpoint_from(conn)
        return self._endpoint

    # -- sync API (workers) ---------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        ep = self.endpoint()
        try:
            with httpx.Client(verify=ep.verify, timeout=self.timeout_s) as client:
                resp = client.request(method, ep.base_url + path, headers=ep.headers(), **kw)
        except httpx.HTTPError as exc:
            raise RayJobsError(_unreachable(ep.base_url, self.ray_conn_id, exc)) from None
        _check_auth(resp, self.ray_conn_id)
        return resp

    def check(self) -> None:
        """Fail with the cause if the dashboard is unreachable or refuses our token."""
        resp = self._request("GET", "/api/jobs/")
        if resp.status_code != 200:
            raise RayJobsError(f"Ray Jobs API answered HTTP {resp.status_code}: {resp.text[:300]}")

    def submit(
        self,
        entrypoint: str,
        submission_id: str,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> str:
        body: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id, "metadata": metadata or {}}
        if runtime_env:
            body["runtime_env"] = runtime_env
        resp = self._request("POST", "/api/jobs/", json=body)
        if resp.status_code != 200:
            raise RayJobsError(f"Ray refused job {submission_id!r} (HTTP {resp.status_code}): {resp.text[:500]}")
        return resp.json()["submission_id"]

    def get_job(self, submission_id: str) -> dict[str, Any] | None:
        resp = self._request("GET", f"/api/jobs/{submission_id}")
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return resp.json()

    def get_logs(self, submission_id: str) -> str:
        resp = self._request("GET", f"/api/jobs/{submission_id}/logs")
        return resp.json().get("logs", "") if resp.status_code == 200 else ""

    def stop(self, submission_id: str) -> bool:
        resp = self._request("POST", f"/api/jobs/{submission_id}/stop")
        return resp.status_code == 200 and bool(resp.json().get("stopped"))

    def list_jobs(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/jobs/").json()

    # -- async API (triggers: never block the triggerer's event loop) ---------------------------
    async def _arequest(self, method: str, path: str, **kw: Any) -> httpx.Response:
        ep = await self.aendpoint()
        try:
            async with httpx.AsyncClient(verify=ep.verify, timeout=self.timeout_s) as client:
                resp = await client.request(method, ep.base_url + path, headers=ep.headers(), **kw)
        except httpx.HTTPError as exc:
            raise RayJobsError(_unreachable(ep.base_url, self.ray_conn_id, exc)) from None
        _check_auth(resp, self.ray_conn_id)
        return resp

    async def aget_job(self, submission_id: str) -> dict[str, Any] | None:
        resp = await self._arequest("GET", f"/api/jobs/{submission_id}")
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return resp.json()

    async def aget_logs(self, submission_id: str) -> str:
        resp = await self._arequest("GET", f"/api/jobs/{submission_id}/logs")
        return resp.json().get("logs", "") if resp.status_code == 200 else ""

    async def astop(self, submission_id: str) -> bool:
        resp = await self._arequest("POST", f"/api/jobs/{submission_id}/stop")
        return resp.status_code == 200 and bool(resp.json().get("stopped"))


def _missing(conn_id: str, exc: Exception) -> str:
    return (
        f"Airflow connection {conn_id!r} not found ({type(exc).__name__}). Create it, e.g. "
        f'AIRFLOW_CONN_{conn_id.upper()}=\'{{"conn_type": "matrix_ray", "host": "<ray head>", '
        f'"port": 8265, "password": "<ray auth token>"}}\''
    )


def _unreachable(base_url: str, conn_id: str, exc: Exception) -> str:
    return (
        f"Ray dashboard {base_url} unreachable ({type(exc).__name__}); check host and port of connection "
        f"{conn_id!r} and that the Ray head is up"
    )


def _check_auth(resp: httpx.Response, conn_id: str) -> None:
    if resp.status_code in (401, 403):
        raise RayJobsError(
            f"Ray refused the token of connection {conn_id!r} (HTTP {resp.status_code}); "
            "set its password to the cluster's token (`ray get-auth-token`)"
        )
