"""A real HTTP reverse proxy in front of a real HTTP service (S3, Ray's dashboard) that fails chosen requests.

It can also go down for a while (`outage()`: the listening socket is closed, so clients get
"connection refused" exactly as when the service behind it is stopped) and come back on the same port,
and hold one chosen request until told to send it on (`hold()` / `release()`: a writer frozen in
the middle of a request, whose request lands late).

    with FaultProxy(s3.endpoint, fail_first=2, method="PUT", path_regex=PART_FILES) as proxy:
        fs = s3fs.S3FileSystem(key=..., secret=..., endpoint_url=proxy.endpoint, **NO_CLIENT_RETRIES)
        ...
        assert proxy.failed == 2

Every request is forwarded unchanged: method, raw path and query (percent-encoding kept), headers
including `Authorization` and `Host`, and the body streamed. Only hop-by-hop headers are dropped
(`Connection`, `Expect`, ...: none of them is in a SigV4 signature). SigV4 signs the Host header,
so the client signs for the proxy's host:port (its endpoint_url is `proxy.endpoint`) and the
proxy sends that same Host upstream; SeaweedFS checks the signature against it and accepts.
Responses come back unchanged (status, headers, body; no decompression). The first `fail_first`
requests whose method and path (the decoded path, no query) match are answered by the proxy
itself with an S3 XML error and never reach S3.

Client-side retries (measured with s3fs 2026.9 / botocore 1.43 against this proxy):

- botocore retries 5xx by itself (legacy mode: up to 5 attempts; standard: 3). Turn it off with
  `config_kwargs={"retries": {"total_max_attempts": 1}}`. Note botocore's `max_attempts` counts
  *retries* (`max_attempts: 1` means two attempts), so `{"max_attempts": 1}` does not turn it off.
- s3fs retries again in `_error_wrapper` (`S3FileSystem.retries`, 5 tries, ~2 s of back-off)
  for errors whose text contains `SlowDown` / `reduce your request rate` and for connection-level
  errors, but not for other `ClientError`s such as `InternalError`. `retries` is a class
  attribute, not a constructor argument: `retries=1` in storage_options reaches
  `AioSession(**kwargs)` and fails with TypeError, so it cannot be set through storage_options.

So with storage_options alone (`NO_CLIENT_RETRIES`), an injected 500 `InternalError` reaches the
caller on the first failure, whereas a 503 `SlowDown` is still retried five times inside s3fs
(set `fs.retries = 1` on the instance to stop that; fsspec caches instances, so use options
unique to the test). Default: 500 InternalError.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

# storage_options that leave retrying to the caller (for an InternalError; see module docstring).
NO_CLIENT_RETRIES: dict[str, object] = {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}

PART_FILES = r"/part-[^/]*\.parquet$"

# Per-hop headers (RFC 9110 7.6.1, plus Expect, which aiohttp answers on each hop); none is signed by SigV4.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Please reduce your request rate.",
}


class FaultProxy:
    """Reverse proxy on 127.0.0.1 (its own event loop in a daemon thread) that fails the first N matches."""

    def __init__(
        self,
        upstream: str,
        *,
        fail_first: int = 1,
        method: str | None = "PUT",
        path_regex: str = PART_FILES,
        status: int = 500,
        code: str = "InternalError",
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.method = method.upper() if method else None
        self.path_re = re.compile(path_regex)
        self.status, self.code = status, code
        self.fail_first = fail_first
        self.matched = 0  # requests that matched the rule (failed or passed on)
        self.failed = 0  # requests answered with the injected error
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request, in order
        self.endpoint = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._hold: tuple[str | None, re.Pattern[str], re.Pattern[str]] | None = None
        self._held = threading.Event()
        self._release: asyncio.Event | None = None

    def hold(self, *, method: str | None, path_regex: str, query_regex: str = "") -> threading.Event:
        """Hold the next request that matches until `release()` (its body read, nothing sent on): a
        client frozen in the middle of a write or a listing. Returns an event set once one is held."""
        assert self._loop is not None
        self._held.clear()
        self._release = asyncio.Event()
        self._hold = (method.upper() if method else None, re.compile(path_regex), re.compile(query_regex))
        return self._held

    def release(self) -> None:
        """Send the held request on (and hold no more)."""
        assert self._loop is not None and self._release is not None
        self._hold = None
        self._loop.call_soon_threadsafe(self._release.set)

    def rule(self, *, method: str | None, path_regex: str, fail_first: int, status: int = 500) -> None:
        """Fail the next `fail_first` requests that match `method` and `path_regex` with `status`."""
        self.method = method.upper() if method else None
        self.path_re = re.compile(path_regex)
        self.status = status
        self.rearm(fail_first)

    def rearm(self, fail_first: int) -> None:
        """Fail the next `fail_first` matching requests (counters keep counting)."""
        self.fail_first = self.failed + fail_first

    def start(self) -> FaultProxy:
        sock = _port_socket(0)
        self.endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(sock), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Down (connection refused, open connections cut) inside the block; back on the same port after."""
        assert self._loop is not None
        # A bound socket that never listens keeps the port ours (an outbound connection could take
        # it as its local port meanwhile) while connections to it are refused.
        holder = _port_socket(int(self.endpoint.rsplit(":", 1)[1]))
        asyncio.run_coroutine_threadsafe(self._runner_down(), self._loop).result(timeout=30)
        try:
            yield
        finally:
            asyncio.run_coroutine_threadsafe(self._runner_up(), self._loop).result(timeout=30)
            holder.close()

    async def _runner_down(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _runner_up(self) -> None:
        await self._listen(_port_socket(int(self.endpoint.rsplit(":", 1)[1])))

    def _holds(self, request: web.Request) -> bool:
        if self._hold is None:
            return False
        method, path_re, query_re = self._hold
        return (method is None or request.method == method) and bool(
            path_re.search(request.path) and query_re.search(request.query_string)
        )

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or method == self.method) and self.path_re.search(path) is not None

    async def _serve(self, sock: socket.socket) -> None:
        # No decompression, no cookie jar, no pool limit: bytes and headers pass through as they are.
        self._client = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        await self._listen(sock)

    async def _listen(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._holds(request):
            self._hold = None
            body = await request.read()
            self._held.set()
            assert self._release is not None
            await self._release.wait()
            return await self._forward(request, body)
        if self.matches(request.method, request.path):
            self.matched += 1
            if self.failed < self.fail_first:
                self.failed += 1
                return await self._inject(request)
        return await self._forward(request)

    async def _inject(self, request: web.Request) -> web.Response:
        """Answer as S3 would when failing: drain the body (keeps the connection usable), XML error."""
        await request.read()
        request_id = f"s3faultproxy-{self.failed}"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.code}</Code><Message>{_MESSAGES.get(self.code, self.code)}</Message>"
            f"<Resource>{request.path}</Resource><RequestId>{request_id}</RequestId></Error>"
        )
        self.log.append((request.method, request.path, self.status))
        return web.Response(
            status=self.status, text=body, content_type="application/xml", headers={"x-amz-request-id": request_id}
        )

    async def _forward(self, request: web.Request, held_body: bytes | None = None) -> web.StreamResponse:
        assert self._client is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        body: Any = held_body if held_body is not None else (request.content if request.body_exists else None)
        async with self._client.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),
            headers=headers,
            data=body,
            allow_redirects=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            compress=None,
        ) as upstream:
            self.log.append((request.method, request.path, upstream.status))
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


def _port_socket(port: int) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:`port` that others of ours may share (SO_REUSEPORT)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    return sock
