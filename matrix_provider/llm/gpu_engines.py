"""vLLM and SGLang on GPU pools through Ray Serve LLM (`ray.serve.llm`): configuration, not engine code.

`llm_config_dict` is plain data (testable anywhere); `build_openai_app` needs the engine installed.
"""

from __future__ import annotations

from typing import Any

from matrix_provider.llm.spec import SGLangSpec, VLLMSpec


def llm_config_dict(spec: VLLMSpec | SGLangSpec) -> dict[str, Any]:
    """The `ray.serve.llm.LLMConfig` fields for a spec."""
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
    if isinstance(spec, SGLangSpec):
        config["llm_engine"] = "SGLang"
    return config


def build_openai_app(spec: VLLMSpec | SGLangSpec) -> Any:
    from ray.serve.llm import LLMConfig
    from ray.serve.llm import build_openai_app as _build

    return _build({"llm_configs": [LLMConfig(**llm_config_dict(spec))]})
