"""SGLang on Ray Serve: its own `sglang.launch_server` process inside a Serve replica.

Configuration, not engine code: `serve_apps.SGLangServer` runs the server; this module sizes its
replicas. Ray Serve LLM's SGLang engine needs SGLang importable in the ingress and replicas just as
its vLLM path does; it stays config-validated here, since SGLang's CPU backend does not run on these
machines (see README, "SGLang").
"""

from __future__ import annotations

from typing import Any

from matrix_provider.llm.spec import SGLangSpec


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


def build_app(spec: SGLangSpec) -> Any:
    from matrix_provider.llm.serve_apps import SGLangServer

    return SGLangServer.options(name="sglang", **sglang_deployment_options(spec)).bind(spec.model_dump(mode="json"))
