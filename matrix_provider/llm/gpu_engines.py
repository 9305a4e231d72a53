"""GPU engines on Ray Serve: vLLM through Ray Serve LLM (`ray.serve.llm`), SGLang as its own server.

Configuration, not engine code. Ray Serve LLM 2.60 accepts only `llm_engine="vLLM"`, so SGLang runs
its `sglang.launch_server` process inside a Serve replica (`serve_apps.SGLangServer`).
`llm_config_dict` is plain data, validated against Ray's own `LLMConfig` in the tests.
"""

from __future__ import annotations

from typing import Any

from matrix_provider.llm.spec import SGLangSpec, VLLMSpec


def llm_config_dict(spec: VLLMSpec) -> dict[str, Any]:
    """The `ray.serve.llm.LLMConfig` fields for a vLLM spec."""
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        **spec.engine_kwargs,
    }
    if spec.max_model_len:
        engine_kwargs["max_model_len"] = spec.max_model_len
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": spec.model, "model_source": spec.model_source or spec.model},
        "deployment_config": {
            "autoscaling_config": {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas},
        },
        "engine_kwargs": engine_kwargs,
    }
    if spec.accelerator_type:
        config["accelerator_type"] = spec.accelerator_type
    return config


def sglang_deployment_options(spec: SGLangSpec) -> dict[str, Any]:
    """Serve options for SGLang replicas: GPUs for tensor x pipeline parallel, autoscaling bounds."""
    gpus = spec.tensor_parallel_size * spec.pipeline_parallel_size
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": spec.num_cpus},
        "autoscaling_config": {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas},
    }
    if spec.accelerator_type:
        options["ray_actor_options"]["accelerator_type"] = spec.accelerator_type
    return options


def build_openai_app(spec: VLLMSpec | SGLangSpec) -> Any:
    if isinstance(spec, SGLangSpec):
        from matrix_provider.llm.serve_apps import SGLangServer

        return SGLangServer.options(name="sglang", **sglang_deployment_options(spec)).bind(spec.model_dump(mode="json"))
    from ray.serve.llm import LLMConfig
    from ray.serve.llm import build_openai_app as build

    return build({"llm_configs": [LLMConfig(**llm_config_dict(spec))]})
