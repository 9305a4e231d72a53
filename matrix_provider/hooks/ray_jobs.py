"""MatrixRayHook: the Ray Jobs REST API over HTTP, sync for workers and async for triggers.

The connection (type `matrix_ray`, default id `matrix_ray_default`) holds the dashboard's host
and port, the Ray auth token as its password, and extras: `tls` (https), `verify_tls`, `ca_bundle`
(a PEM file of the CA that signed the dashboard's certificate),
`dashboard_url` (public link for the UI), `grafana_url`, `retry_s` (how long one call rides out
an outage, default 30).

Every call retries connection errors and HTTP 5xx with exponential backoff for up to `retry_s`
seconds, then raises `RayUnavailable` naming the URL and how long it was down: a dashboard
restart or a network blip must not fail a task whose Ray job is still running. Logs are read
as a tail (the State API's `lines=`), never whole: a day-long job prints tens of thousands of
lines.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import tenacity
from airflow.sdk import BaseHook
from airflow.sdk.log import amask_secret, mask_secret

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE = frozenset({"PENDING", "RUNNING"})
DEFAULT_RETRY_S = 30.0
_FALSE = frozenset({"false", "0", "no", "off", ""})


class RayJobsError(RuntimeError):
    """The Ray Jobs API cannot be used; the message names the cause and the fix."""


class RayUnavailable(RayJobsError):
    """The dashboard stayed unreachable (or answered 5xx) for the whole retry window."""


class _Transient(Exception):
    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def flag(value: Any, default: bool) -> bool:
    """A boolean connection extra: from a URI every extra is a string, and `"false"` is truthy."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE
    return bool(value)


@dataclass(frozen=True)
class RayEndpoint:
    base_url: str
    token: str | None = field(repr=False)  # a logged or printed endpoint never shows it
    verify: bool | str  # False, True (the system's CAs) or the path of a CA bundle
    dashboard_url: str
    grafana_url: str | None
    retry_s: float = 30.0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class MatrixRayHook(BaseHook):
    conn_name_attr = "ray_conn_id"
    default_conn_name = "matrix_ray_default"
    conn_type = "matrix_ray"
    hook_name = "Matrix on Ray (Jobs API)"

    def __init__(
        self,
        ray_conn_id: str = default_conn_name,
        timeout_s: float = 30.0,
        retry_s: float | None = None,
        cluster: dict[str, Any] | None = None,
    ) -> None:
        """`cluster`: what a cluster setup task handed on (`dashboard_url`, `token_file`); used instead of
        the connection, so a cluster brought up for one DAG run needs no pre-made connection."""
        super().__init__()
        self.ray_conn_id = ray_conn_id
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._endpoint: RayEndpoint | None = None
        self._async_client: httpx.AsyncClient | None = None

    # -- connection -----------------------------------------------------------------------------
    def _endpoint_from(self, conn: Any) -> RayEndpoint:
        extra = conn.extra_dejson or {}
        if not conn.host:
            raise RayJobsError(f"connection {self.ray_conn_id!r} has no host: set the Ray dashboard's host")
        scheme = "https" if flag(extra.get("tls"), False) or conn.schema == "https" else "http"
        base = f"{scheme}://{conn.host}:{conn.port or 8265}"
        return RayEndpoint(
            base_url=base,
            token=conn.password or None,
            verify=(extra.get("ca_bundle") or True) if flag(extra.get("verify_tls"), True) else False,
            dashboard_url=str(extra.get("dashboard_url") or base).rstrip("/"),
            grafana_url=extra.get("grafana_url") or None,
            retry_s=float(extra.get("retry_s") or DEFAULT_RETRY_S),
        )

    def _endpoint_of_cluster(self, cluster: dict[str, Any]) -> RayEndpoint:
        url = str(cluster.get("dashboard_url") or "").rstrip("/")
        if not url:
            raise RayJobsError(f"cluster {cluster.get('name')!r} has no dashboard address: did its setup task succeed?")
        try:
            token = Path(cluster["token_file"]).read_text().strip() if cluster.get("token_file") else None
        except OSError as exc:
            raise RayJobsError(f"cannot read cluster {cluster.get('name')!r}'s token file: {exc}") from None
        return RayEndpoint(url, token, True, url, None, DEFAULT_RETRY_S)

    def endpoint(self) -> RayEndpoint:
        if self._endpoint is None and self.cluster:
            self._endpoint = self._endpoint_of_cluster(self.cluster)
            if self._endpoint.token:  # Airflow masks a connection's password, never a file's token
                mask_secret(self._endpoint.token)
        if self._endpoint is None:
            try:
                conn = self.get_connection(self.ray_conn_id)
            except Exception as exc:  # AirflowNotFoundException lives in different modules across versions
                raise RayJobsError(_missing(self.ray_conn_id, exc)) from None
            self._endpoint = self._endpoint_from(conn)
        return self._endpoint

    async def aendpoint(self) -> RayEndpoint:
        if self._endpoint is None and self.cluster:
            # A file read off the triggerer's event loop: a slow shared filesystem stalls no other trigger.
            self._endpoint = await asyncio.to_thread(self._endpoint_of_cluster, self.cluster)
            if self._endpoint.token:
                await amask_secret(self._endpoint.token)
        if self._endpoint is None:
            try:
                conn = await self.aget_connection(self.ray_conn_id)
            except Exception as exc:
                raise RayJobsError(_missing(self.ray_conn_id, exc)) from None
            self._endpoint = self._endpoint_from(conn)
        return self._endpoint

    def test_connection(self) -> tuple[bool, str]:
        """The UI's Test button: the dashboard answers, and a token-checked endpoint accepts our token.

        Asks for a job that does not exist (404 means authorised) instead of listing every job.
        """
        try:
            version = self._request("GET", "/api/version", retry=False).json()
            self._request("GET", f"/api/jobs/matrix-connection-test-{uuid.uuid4().hex[:8]}", retry=False)
        except RayJobsError as exc:
            return False, str(exc)
        return True, f"Ray {version.get('ray_version', '?')} at {self.endpoint().base_url} accepted the token"

    # -- retries --------------------------------------------------------------------------------
    def _retry_policy(self, ep: RayEndpoint, retry: bool) -> dict[str, Any]:
        window = (self.retry_s if self.retry_s is not None else ep.retry_s) if retry else 0
        return {
            "stop": tenacity.stop_after_delay(window),
            "wait": tenacity.wait_exponential(multiplier=0.5, max=8),
            "retry": tenacity.retry_if_exception_type(_Transient),
            "reraise": True,
        }

    def _classify(self, resp: httpx.Response, retry_5xx: bool) -> httpx.Response:
        _check_auth(resp, self.ray_conn_id)
        if retry_5xx and resp.status_code >= 500:
            raise _Transient(f"HTTP {resp.status_code}: {resp.text[:200]}")
        return resp

    def _unavailable(self, base_url: str, started: float, exc: _Transient) -> RayUnavailable:
        return RayUnavailable(
            f"Ray dashboard {base_url} unavailable for {time.monotonic() - started:.0f}s ({exc.cause}); check "
            f"host and port of connection {self.ray_conn_id!r} and that the Ray head is up"
        )

    # -- sync API (workers) ---------------------------------------------------------------------
    def _request(self, method: str, path: str, retry: bool = True, retry_5xx: bool = True, **kw: Any) -> httpx.Response:
        ep = self.endpoint()
        started = time.monotonic()

        def once() -> httpx.Response:
            try:
                with httpx.Client(verify=_tls(ep.verify), timeout=self.timeout_s) as client:
                    resp = client.request(method, ep.base_url + path, headers=ep.headers(), **kw)
            except httpx.HTTPError as exc:
                raise _Transient(type(exc).__name__) from None
            return self._classify(resp, retry_5xx)

        try:
            return tenacity.Retrying(**self._retry_policy(ep, retry))(once)
        except _Transient as exc:
            raise self._unavailable(ep.base_url, started, exc) from None

    def version(self) -> dict[str, Any]:
        """One cheap call that proves the dashboard is up (never lists the cluster's jobs)."""
        resp = self._request("GET", "/api/version")
        if resp.status_code != 200:
            raise RayJobsError(f"Ray dashboard answered HTTP {resp.status_code} on /api/version: {resp.text[:300]}")
        return resp.json()

    def submit(
        self,
        entrypoint: str,
        submission_id: str,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        placement: dict[str, Any] | None = None,
    ) -> str:
        body: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id, "metadata": metadata or {}}
        if runtime_env:
            body["runtime_env"] = runtime_env
        body |= placement or {}
        # A POST is not safe to repeat blindly: a resend after a lost answer hits "already exists"
        # (HTTP 500). So no 5xx retries here; after any failure, a job under our id means submitted.
        try:
            resp = self._request("POST", "/api/jobs/", retry_5xx=False, json=body)
        except RayUnavailable:
            if self.get_job(submission_id) is None:
                raise
            return submission_id
        if resp.status_code != 200:
            if resp.status_code >= 500 and self.get_job(submission_id) is not None:
                return submission_id
            raise RayJobsError(f"Ray refused job {submission_id!r} (HTTP {resp.status_code}): {resp.text[:500]}")
        return resp.json()["submission_id"]

    def get_job(self, submission_id: str) -> dict[str, Any] | None:
        resp = self._request("GET", f"/api/jobs/{quote(submission_id)}")
        return None if resp.status_code == 404 else _json(resp)

    def tail_logs(self, submission_id: str, lines: int = 200, node_id: str | None = None) -> str:
        """The last `lines` lines of the job's driver log ("" when Ray has none yet or any more).

        The State API needs the driver's node (`driver_node_id` of the job); it answers 500 for a
        log that is not written yet or already gone, which no retry changes.
        """
        node_id = node_id or (self.get_job(submission_id) or {}).get("driver_node_id")
        if not node_id:
            return ""
        resp = self._request("GET", _tail_path(submission_id, lines, node_id), retry_5xx=False)
        return resp.text if resp.status_code == 200 else ""

    def stop(self, submission_id: str) -> bool:
        resp = self._request("POST", f"/api/jobs/{quote(submission_id)}/stop")
        return resp.status_code == 200 and bool(resp.json().get("stopped"))

    def list_jobs(self) -> list[dict[str, Any]]:
        return _json(self._request("GET", "/api/jobs/"))

    # -- async API (triggers: never block the triggerer's event loop) ---------------------------
    async def _arequest(self, method: str, path: str, retry_5xx: bool = True, **kw: Any) -> httpx.Response:
        ep = await self.aendpoint()
        started = time.monotonic()

        async def once() -> httpx.Response:
            try:
                client = await self._aclient(ep)
                resp = await client.request(method, ep.base_url + path, headers=ep.headers(), **kw)
            except httpx.HTTPError as exc:
                raise _Transient(type(exc).__name__) from None
            return self._classify(resp, retry_5xx)

        try:
            return await tenacity.AsyncRetrying(**self._retry_policy(ep, True))(once)
        except _Transient as exc:
            raise self._unavailable(ep.base_url, started, exc) from None

    async def _aclient(self, ep: RayEndpoint) -> httpx.AsyncClient:
        """One client per hook, built in a thread: its SSL context loads the CA bundle (~40 ms)."""
        if self._async_client is None:
            self._async_client = await asyncio.to_thread(
                lambda: httpx.AsyncClient(verify=_tls(ep.verify), timeout=self.timeout_s)
            )
        return self._async_client

    async def aclose(self) -> None:
        if self._async_client is not None:
            await self._async_client.aclose()
            self._async_client = None

    async def aget_job(self, submission_id: str) -> dict[str, Any] | None:
        resp = await self._arequest("GET", f"/api/jobs/{quote(submission_id)}")
        return None if resp.status_code == 404 else _json(resp)

    async def atail_logs(self, submission_id: str, lines: int = 200, node_id: str | None = None) -> str:
        node_id = node_id or ((await self.aget_job(submission_id)) or {}).get("driver_node_id")
        if not node_id:
            return ""
        resp = await self._arequest("GET", _tail_path(submission_id, lines, node_id), retry_5xx=False)
        return resp.text if resp.status_code == 200 else ""

    async def astop(self, submission_id: str) -> bool:
        resp = await self._arequest("POST", f"/api/jobs/{quote(submission_id)}/stop")
        return resp.status_code == 200 and bool(resp.json().get("stopped"))


def _tls(verify: bool | str) -> bool | ssl.SSLContext:
    """httpx's `verify`: a CA bundle's path becomes a context that trusts it (httpx takes no path)."""
    if isinstance(verify, str):
        try:
            return ssl.create_default_context(cafile=verify)
        except (OSError, ssl.SSLError) as exc:
            raise RayJobsError(f"cannot load the connection's ca_bundle {verify!r}: {exc}") from None
    return verify


def _tail_path(submission_id: str, lines: int, node_id: str) -> str:
    query = f"submission_id={quote(submission_id)}&node_id={quote(node_id)}&lines={int(lines)}"
    return f"/api/v0/logs/file?{query}&filter_ansi_code=true"


def _json(resp: httpx.Response) -> Any:
    if resp.status_code != 200:
        raise RayJobsError(f"Ray Jobs API answered HTTP {resp.status_code} on {resp.url.path}: {resp.text[:300]}")
    return resp.json()


def _missing(conn_id: str, exc: Exception) -> str:
    return (
        f"Airflow connection {conn_id!r} not found ({type(exc).__name__}). Create it, e.g. "
        f'AIRFLOW_CONN_{conn_id.upper()}=\'{{"conn_type": "matrix_ray", "host": "<ray head>", '
        f'"port": 8265, "password": "<ray auth token>"}}\''
    )


def _check_auth(resp: httpx.Response, conn_id: str) -> None:
    if resp.status_code in (401, 403):
        raise RayJobsError(
            f"Ray refused the token of connection {conn_id!r} (HTTP {resp.status_code}); "
            "set its password to the cluster's token (`ray get-auth-token`)"
        )
