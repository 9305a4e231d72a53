"""One async OpenAI-compatible client for every LLM role.

It balances over the endpoints of a backend with rendezvous hashing on a sticky key, so every
turn of one row lands on the same replica (prefix-cache reuse), and sends the same key as Ray
Serve's multiplexed-model header (our own Serve apps) and as Serve's session header (Ray Serve
LLM's ConsistentHashRouter), so a Serve app with several replicas keeps it sticky too.
Retries 429/5xx/connection errors/timeouts with exponential backoff and jitter (tenacity);
other 4xx (a prompt longer than the context, say) fail the step at once with the server's reason.

The transport is aiohttp, not httpx: httpcore's connection pool rescans every connection for every
queued request, which at 64 to 1,024 requests in flight cost 14-23 ms of CPU per request against
0.35-0.42 ms for aiohttp on this machine (encode/httpcore#1035; measured by bench/transport.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

SERVE_STICKY_HEADER = "serve_multiplexed_model_id"
SERVE_SESSION_HEADER = "x-session-id"  # Serve's default RAY_SERVE_SESSION_ID_HEADER_KEY
REPLICA_HEADER = "x-matrix-replica"
ATTEMPT_HEADER = "x-matrix-attempt"
_UNHEALTHY_FOR_S = 5.0


@dataclass(frozen=True)
class ClientConfig:
    """What an agent needs to reach a deployed backend (no secrets: only the key's env var name)."""

    endpoints: tuple[str, ...]
    model: str
    timeout_s: float = 60.0
    retries: int = 4
    backoff_s: float = 0.25
    max_connections: int = 1024
    sticky_buckets: int = 256
    api_key_env: str | None = None

    def auth_headers(self) -> dict[str, str]:
        """Bearer header from the key's environment variable (the key itself never travels in config)."""
        if not self.api_key_env:
            return {}
        key = os.environ.get(self.api_key_env)
        if not key:
            raise LLMError(f"API key missing: environment variable {self.api_key_env} is not set")
        return {"Authorization": f"Bearer {key}"}


class LLMError(RuntimeError):
    """A request failed for good; `retryable` says whether the whole step may be tried again."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    replica: str | None = None
    attempts: int = 1


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    failures: int = 0


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, LLMError) and exc.retryable


def _score(key: str, endpoint: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{endpoint}".encode(), digest_size=8).digest(), "big")


class LLMClient:
    """Async client shared by all tasks of one agent actor."""

    def __init__(self, config: ClientConfig):
        if not config.endpoints:
            raise ValueError("LLM client needs at least one endpoint")
        self.config = config
        self.stats = ClientStats()
        self._unhealthy_until: dict[str, float] = {}
        self._headers = config.auth_headers()
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        """The session, made on first use: aiohttp binds it to the running event loop."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=self.config.max_connections, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s, connect=10.0),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def sticky_bucket(self, key: str) -> str:
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return f"b{int.from_bytes(digest, 'big') % self.config.sticky_buckets}"

    def pick_endpoint(self, key: str) -> str:
        """Highest rendezvous score among healthy endpoints: stable per key, even spread over keys."""
        now = time.monotonic()
        healthy = [e for e in self.config.endpoints if self._unhealthy_until.get(e, 0.0) <= now]
        return max(healthy or self.config.endpoints, key=lambda e: _score(key, e))

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        sticky_key: str,
        max_tokens: int,
        temperature: float = 0.0,
        frequency_penalty: float = 0.0,
        response_format: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Completion:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if frequency_penalty:  # only when asked: not every OpenAI-compatible server takes it
            body["frequency_penalty"] = frequency_penalty
        if response_format is not None:
            body["response_format"] = response_format
        if tools:
            body["tools"] = tools
        return await self._request("/chat/completions", body, sticky_key)

    async def complete(self, prompt: str, *, sticky_key: str, max_tokens: int, temperature: float = 0.0) -> Completion:
        body = {
            "model": self.config.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        return await self._request("/completions", body, sticky_key)

    async def _request(self, path: str, body: dict[str, Any], sticky_key: str) -> Completion:
        bucket = self.sticky_bucket(sticky_key)
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.retries + 1),
            wait=wait_exponential_jitter(multiplier=self.config.backoff_s, max=30.0, jitter=self.config.backoff_s),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    if attempts > 1:
                        self.stats.retries += 1
                    completion = await self._once(path, body, bucket, attempts)
                    completion.attempts = attempts
                    return completion
        except LLMError:
            self.stats.failures += 1
            raise
        raise AssertionError("unreachable")

    async def _once(self, path: str, body: dict[str, Any], bucket: str, attempt: int) -> Completion:
        endpoint = self.pick_endpoint(bucket)
        self.stats.requests += 1
        try:
            async with self._http().post(
                endpoint.rstrip("/") + path,
                json=body,
                headers={SERVE_STICKY_HEADER: bucket, SERVE_SESSION_HEADER: bucket, ATTEMPT_HEADER: str(attempt)},
            ) as resp:
                status, text, replica = resp.status, await resp.text(), resp.headers.get(REPLICA_HEADER)
        except TimeoutError:
            raise LLMError(f"LLM request to {endpoint} timed out", retryable=True) from None
        except aiohttp.ClientError as exc:
            self._unhealthy_until[endpoint] = time.monotonic() + _UNHEALTHY_FOR_S
            raise LLMError(f"LLM endpoint {endpoint} unreachable: {type(exc).__name__}", retryable=True) from None
        if status != 200:
            retryable = status == 429 or status >= 500
            raise LLMError(f"LLM HTTP {status}: {_error_text(text)}", status=status, retryable=retryable)
        try:
            return _parse(json.loads(text), replica)
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError(f"LLM answer from {endpoint} is not an OpenAI completion: {text[:200]!r}") from None


def _error_text(text: str) -> str:
    try:
        payload = json.loads(text)
        err = payload.get("error", payload)
        message = err.get("message") if isinstance(err, dict) else err
        return str(message)[:500]
    except (ValueError, AttributeError):
        return text[:500]


def _parse(data: dict[str, Any], replica: str | None) -> Completion:
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    if "message" in choice:
        message = choice["message"]
        text = message.get("content") or ""
        tool_calls = message.get("tool_calls") or []
    else:
        text, tool_calls = choice.get("text", ""), []
    return Completion(
        text=text,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        finish_reason=choice.get("finish_reason"),
        tool_calls=tool_calls,
        replica=replica,
    )
