"""Deploy the backend a spec names and return how agents reach it.

Served backends (`embedded`, `vllm`, `sglang`, `azure_openai`, `gemini`) become Ray Serve
applications behind Serve's HTTP proxy on 127.0.0.1; the `sim` load simulator runs as detached
actors the client reaches directly; `openai` points at endpoints that already exist. Every
backend is probed before any row is admitted, so a dead endpoint or a missing key fails the run
at once with one message.
"""

from __future__ import annotations

import os
import re
from typing import Any

import httpx

from matrix_provider.llm.client import ClientConfig, LLMError
from matrix_provider.llm.spec import (
    AzureOpenAISpec,
    EmbeddedSpec,
    GeminiSpec,
    OpenAISpec,
    SGLangSpec,
    SimSpec,
    VLLMSpec,
)

DEFAULT_SERVE_PORT = 8000
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit)|AssertionError)(\(.*\))?: \S")


class BackendError(RuntimeError):
    """The LLM backend cannot serve this run; the message says why and what to do."""


def app_name(spec: Any) -> str:
    return getattr(spec, "app_name", None) or f"matrix-{spec.backend.replace('_', '-')}"


def serve_port() -> int:
    return int(os.environ.get("MATRIX_SERVE_PORT", DEFAULT_SERVE_PORT))


def build_app(spec: Any) -> Any:
    """The Serve application for a served backend (not yet running)."""
    from ray.serve.schema import LoggingConfig

    from matrix_provider.llm import serve_apps, sglang_app

    options = {
        "num_replicas": spec.replicas,
        "ray_actor_options": {"num_cpus": spec.num_cpus},
        "logging_config": LoggingConfig(enable_access_log=False, log_level="WARNING"),
    }
    payload = spec.model_dump(mode="json")
    if isinstance(spec, EmbeddedSpec):
        return serve_apps.EmbeddedServer.options(name="embedded", **options).bind(payload)
    if isinstance(spec, AzureOpenAISpec | GeminiSpec):
        return serve_apps.ProxyServer.options(name=spec.backend, **options).bind(payload)
    if isinstance(spec, SGLangSpec):
        return sglang_app.build_app(spec)
    raise BackendError(f"backend {spec.backend!r} is not served by matrix")


def deploy(spec: Any) -> ClientConfig:
    """Start (or reuse) the backend's Serve app and return the client's view of it."""
    if isinstance(spec, OpenAISpec):
        return client_config(spec, tuple(spec.endpoints))
    name = app_name(spec)
    if isinstance(spec, SimSpec):
        from matrix_provider.llm.sim_server import deploy_sim

        return client_config(spec, deploy_sim(spec, name))
    import ray
    from ray import serve

    from matrix_provider.llm import vllm_app

    if _running(name):
        return client_config(spec, (f"http://127.0.0.1:{serve_port()}/{name}/v1",))
    problem = vllm_app.missing_weights(spec) if isinstance(spec, VLLMSpec) else None
    if problem:
        raise BackendError(problem)
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port()})
    try:
        if isinstance(spec, VLLMSpec):  # built where vLLM is installed: see vllm_app
            vllm_app.deploy(spec, name, f"/{name}")
        else:
            serve.run(build_app(spec), name=name, route_prefix=f"/{name}")
    except ImportError as exc:
        raise BackendError(
            f"backend {spec.backend!r} needs its engine installed on the cluster: {_cause(exc)}"
        ) from None
    except (RuntimeError, ray.exceptions.RayError) as exc:
        reason = _failure_detail(name, exc)
        serve.delete(name)  # nothing half-deployed keeps restarting engines
        raise BackendError(f"backend {spec.backend!r} did not start: {reason}") from None
    return client_config(spec, (f"http://127.0.0.1:{serve_port()}/{name}/v1",))


def _cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, not Ray's wrapper (whose text holds the whole traceback)."""
    return getattr(exc, "cause", None) or exc


def engine_reason(text: str, limit: int = 600) -> str:
    """The engine's own words in a traceback: its last `SomeError: ...` line and the lines that
    continue it (pydantic puts vLLM's config complaint on the next line), without pydantic's tail."""
    lines = [line.strip() for line in text.splitlines()]
    starts = [i for i, line in enumerate(lines) if _ERROR_LINE.match(line)]
    if not starts:
        return next((line for line in reversed(lines) if line), text)[:limit]
    parts = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1 :]:
        if not line or line.startswith(("File ", "For further information")) or _ERROR_LINE.match(line):
            break
        parts.append(line)
    return re.sub(r"\s*\[type=.*", "", " ".join(parts))[:limit]


def _failure_detail(name: str, exc: BaseException) -> str:
    """Why a deploy failed: Serve's app message says only which deployment; its own message holds
    the replica's traceback."""
    from ray import serve

    try:
        deployments = serve.status().applications[name].deployments.values()
    except Exception:  # the app is gone already
        deployments = []
    messages = [d.message for d in deployments if d.message]
    return engine_reason("\n".join(messages) or str(_cause(exc)))


def _reason(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return resp.text[:300]


def _running(name: str) -> bool:
    """An app of this name (its name hashes its settings) is already up: reuse it, do not redeploy."""
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception:  # Serve not started on this cluster yet
        return False
    return app is not None and app.status == "RUNNING"


def client_config(spec: Any, endpoints: tuple[str, ...]) -> ClientConfig:
    return ClientConfig(
        endpoints=endpoints,
        model=spec.model,
        timeout_s=spec.timeout_s,
        retries=spec.retries,
        backoff_s=spec.backoff_s,
        max_connections=spec.max_connections,
        sticky_buckets=getattr(spec, "sticky_buckets", 256),
        api_key_env=getattr(spec, "api_key_env", None) if isinstance(spec, OpenAISpec) else None,
    )


def probe(config: ClientConfig, timeout_s: float = 30.0) -> None:
    """One tiny request per endpoint; raise BackendError naming the first that refuses us.

    A slow answer is not fatal here (rows have their own timeouts); a refused connection,
    a rejected key or a missing model is.
    """
    try:
        headers = config.auth_headers()
    except LLMError as exc:
        raise BackendError(str(exc)) from None
    body = {"model": config.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    for endpoint in config.endpoints:
        try:
            resp = httpx.post(f"{endpoint.rstrip('/')}/chat/completions", json=body, headers=headers, timeout=timeout_s)
        except httpx.TimeoutException:
            continue
        except httpx.HTTPError as exc:
            raise BackendError(
                f"LLM endpoint {endpoint} is unreachable ({type(exc).__name__}); "
                "check the URL and that the server is running"
            ) from None
        if resp.status_code in (401, 403):
            raise BackendError(
                f"LLM endpoint {endpoint} refused the API key (HTTP {resp.status_code}): {_reason(resp)}"
            )
        if resp.status_code == 404:
            raise BackendError(f"LLM endpoint {endpoint} has no model {config.model!r} or no such route (HTTP 404)")
        if resp.status_code >= 500 and resp.status_code != 503:
            # A simulator with injected faults may answer 500 to the probe; only refusal is fatal.
            continue
