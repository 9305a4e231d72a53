"""Ray Serve deployments that give every backend one OpenAI-compatible HTTP surface.

Each replica answers `/v1/chat/completions` and `/v1/completions` under its app's route prefix,
tags its answers with `x-matrix-replica`, and registers the client's sticky key through
`serve.multiplexed`, so Serve routes every turn of a row to the replica that served it before.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from matrix_provider.llm.client import ATTEMPT_HEADER, REPLICA_HEADER
from matrix_provider.llm.hf_weights import shipped_gguf
from matrix_provider.llm.spec import AzureOpenAISpec, EmbeddedSpec, GeminiSpec, SGLangSpec

STICKY_KEYS_PER_REPLICA = 4096


class _OpenAISurface:
    """Shared request plumbing: sticky-key registration, routing by path, replica tag."""

    def _init_surface(self) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id

    @serve.multiplexed(max_num_models_per_replica=STICKY_KEYS_PER_REPLICA)
    async def _sticky(self, key: str) -> str:
        return key

    async def __call__(self, request: Request) -> JSONResponse:
        key = serve.get_multiplexed_model_id()
        if key:
            await self._sticky(key)
        path = request.url.path
        if request.method == "GET":
            return JSONResponse(await self.get(path), headers={REPLICA_HEADER: self.replica})
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"message": "request body is not JSON"}}, status_code=400)
        if not (path.endswith("/chat/completions") or path.endswith("/completions")):
            return JSONResponse({"error": {"message": f"no route {path}"}}, status_code=404)
        attempt = int(request.headers.get(ATTEMPT_HEADER, "1"))
        status, payload = await self.generate(path, body, attempt)
        return JSONResponse(payload, status_code=status, headers={REPLICA_HEADER: self.replica})

    async def get(self, path: str) -> dict[str, Any]:
        return {"status": "ok"}

    async def generate(self, path: str, body: dict[str, Any], attempt: int) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@serve.deployment(max_ongoing_requests=1024)
class EmbeddedServer(_OpenAISurface):
    """SmolLM2 through llama.cpp (xllamacpp) in the replica's process, continuous batching."""

    def __init__(self, spec: dict[str, Any]):
        import xllamacpp

        self._init_surface()
        cfg = EmbeddedSpec.model_validate(spec)
        params = xllamacpp.CommonParams()
        params.model.path = cfg.model_path or str(shipped_gguf())
        params.n_ctx = cfg.n_ctx * cfg.n_parallel  # llama.cpp splits n_ctx over the slots
        params.n_parallel = cfg.n_parallel
        params.cont_batching = True
        params.cpuparams.n_threads = cfg.n_threads
        params.cpuparams_batch.n_threads = cfg.n_threads
        params.hostnames = ["127.0.0.1"]
        params.port = _free_port()
        params.verbosity = -1
        self.model = cfg.model
        self.server = xllamacpp.Server(params)
        self.pool = ThreadPoolExecutor(max_workers=cfg.n_parallel * 2, thread_name_prefix="llama")

    async def get(self, path: str) -> dict[str, Any]:
        return {"status": "ok", "model": self.model}

    async def generate(self, path: str, body: dict[str, Any], attempt: int) -> tuple[int, dict[str, Any]]:
        chat = path.endswith("/chat/completions")
        handler = self.server.handle_chat_completions if chat else self.server.handle_completions
        result = await asyncio.get_running_loop().run_in_executor(self.pool, handler, body)
        if "error" in result:
            return int(result["error"].get("code", 500)), result
        result["model"] = self.model
        return 200, result


class _Forwarder(_OpenAISurface):
    """Forwards OpenAI-format requests to an upstream HTTP server and returns its answer."""

    def _init_forwarder(self, timeout_s: float) -> None:
        self._init_surface()
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=10.0)
        self.http: aiohttp.ClientSession | None = None

    def upstream_request(self, path: str) -> tuple[str, dict[str, str], dict[str, str]]:
        """(url, headers, query) for a request to `path`."""
        raise NotImplementedError

    def scrub(self, text: str) -> str:
        return text

    async def forward(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        url, headers, query = self.upstream_request(path)
        if self.http is None:  # aiohttp binds a session to the running loop, so make it here
            self.http = aiohttp.ClientSession(timeout=self.timeout, connector=aiohttp.TCPConnector(limit=0))
        try:
            async with self.http.post(url, json=body, headers=headers, params=query) as resp:
                status, text = resp.status, await resp.text()
        except (TimeoutError, aiohttp.ClientError) as exc:
            host = url.split("/")[2]
            return 502, {"error": {"message": f"upstream {host} unreachable: {type(exc).__name__}"}}
        if status != 200:
            return status, {"error": {"message": self.scrub(text[:500])}}
        try:
            return 200, json.loads(text)
        except ValueError:
            return 502, {"error": {"message": f"upstream answer is not JSON: {self.scrub(text[:200])}"}}


@serve.deployment(max_ongoing_requests=4096)
class ProxyServer(_Forwarder):
    """Azure OpenAI or Gemini with the key from the cluster's environment.

    The key is read in the replica; it is sent upstream and scrubbed from anything returned.
    """

    def __init__(self, spec: dict[str, Any]):
        model = AzureOpenAISpec if spec["backend"] == "azure_openai" else GeminiSpec
        self.cfg = model.model_validate(spec)
        self._init_forwarder(self.cfg.timeout_s)
        self.key = os.environ.get(self.cfg.api_key_env, "")

    async def get(self, path: str) -> dict[str, Any]:
        return {"status": "ok" if self.key else f"missing key: {self.cfg.api_key_env} is not set"}

    def upstream_request(self, path: str) -> tuple[str, dict[str, str], dict[str, str]]:
        suffix = "chat/completions" if path.endswith("/chat/completions") else "completions"
        base = self.cfg.upstream.rstrip("/")
        if isinstance(self.cfg, AzureOpenAISpec):
            url = f"{base}/openai/deployments/{self.cfg.model}/{suffix}"
            return url, {"api-key": self.key}, {"api-version": self.cfg.api_version}
        return f"{base}/{suffix}", {"Authorization": f"Bearer {self.key}"}, {}

    def scrub(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    async def generate(self, path: str, body: dict[str, Any], attempt: int) -> tuple[int, dict[str, Any]]:
        if not self.key:
            return 401, {"error": {"message": f"API key missing: set {self.cfg.api_key_env} on the cluster"}}
        return await self.forward(path, {**body, "model": self.cfg.model})


def sglang_command(spec: dict[str, Any], port: int) -> list[str]:
    """SGLang's own OpenAI server for one replica (tensor/pipeline parallel inside the replica)."""
    cfg = SGLangSpec.model_validate(spec)
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        cfg.model_source or cfg.model,
        "--served-model-name",
        cfg.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tp-size",
        str(cfg.tensor_parallel_size),
        "--pp-size",
        str(cfg.pipeline_parallel_size),
    ]
    if cfg.max_model_len:
        cmd += ["--context-length", str(cfg.max_model_len)]
    for key, value in cfg.engine_kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


@serve.deployment(max_ongoing_requests=4096, health_check_period_s=10)
class SGLangServer(_Forwarder):
    """SGLang's server process under a Serve replica (Ray Serve LLM 2.60 runs only vLLM engines)."""

    def __init__(self, spec: dict[str, Any], startup_timeout_s: float = 1800.0):
        self._init_forwarder(SGLangSpec.model_validate(spec).timeout_s)
        self.port = _free_port()
        self.process = subprocess.Popen(sglang_command(spec, self.port))
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"SGLang server exited with code {self.process.returncode} while starting")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"SGLang server not healthy after {startup_timeout_s:g}s")
            time.sleep(2)

    def check_health(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"SGLang server exited with code {self.process.returncode}")

    def upstream_request(self, path: str) -> tuple[str, dict[str, str], dict[str, str]]:
        suffix = "chat/completions" if path.endswith("/chat/completions") else "completions"
        return f"http://127.0.0.1:{self.port}/v1/{suffix}", {}, {}

    async def generate(self, path: str, body: dict[str, Any], attempt: int) -> tuple[int, dict[str, Any]]:
        return await self.forward(path, body)

    def __del__(self) -> None:
        if getattr(self, "process", None) is not None and self.process.poll() is None:
            self.process.terminate()
