"""The Serve configuration we generate for vLLM on GPUs and for SGLang (neither runs here; vLLM's CPU
build does, in tests/test_vllm.py), and how a failed engine start is reported."""

from __future__ import annotations

import sys

from matrix_provider.llm.backends import engine_reason
from matrix_provider.llm.serve_apps import sglang_command
from matrix_provider.llm.sglang_app import sglang_deployment_options
from matrix_provider.llm.spec import SGLangSpec, VLLMSpec
from matrix_provider.llm.vllm_app import CONSISTENT_HASH_ROUTER, ROUND_ROBIN_ROUTER, llm_config_dict
from tests.conftest import run_matrix
from tests.corpus import write_jsonl


def test_vllm_config_is_a_valid_ray_serve_llm_config() -> None:
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig  # importable without vLLM

    spec = VLLMSpec(
        backend="vllm",
        model="meta-llama/Llama-3.1-8B-Instruct",
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        min_replicas=1,
        max_replicas=8,
        max_model_len=8192,
        accelerator_type="A100",
        engine_kwargs={"gpu_memory_utilization": 0.9},
    )
    config = LLMConfig(**llm_config_dict(spec))
    assert config.model_loading_config.model_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert config.engine_kwargs["tensor_parallel_size"] == 2
    assert config.engine_kwargs["pipeline_parallel_size"] == 2
    assert config.engine_kwargs["max_model_len"] == 8192
    assert config.engine_kwargs["gpu_memory_utilization"] == 0.9
    assert config.accelerator_type == "A100"
    autoscaling = config.deployment_config["autoscaling_config"]
    assert autoscaling == {"min_replicas": 1, "max_replicas": 8}
    assert config.deployment_config["request_router_config"]["request_router_class"] == CONSISTENT_HASH_ROUTER
    assert config.placement_group_config is None and config.runtime_env is None  # Ray picks the GPU bundles


def test_vllm_cpu_config_asks_for_cpu_bundles_its_env_and_the_router() -> None:
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    spec = VLLMSpec(
        backend="vllm",
        model="smol",
        model_source="/weights/smol",
        device="cpu",
        num_cpus=2,
        routing="round_robin",
        engine_env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        python="venv/bin/python",
    )
    config = LLMConfig(**llm_config_dict(spec))
    assert config.placement_group_config == {"bundles": [{"CPU": 2.0}]}
    assert config.deployment_config["ray_actor_options"] == {"num_cpus": 0}  # the bundle is the replica's share
    assert config.runtime_env == {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}
    assert config.deployment_config["request_router_config"]["request_router_class"] == ROUND_ROBIN_ROUTER
    assert config.callback_config.callback_class.endswith("LocalWeights")  # local weights: no download task
    assert spec.python.startswith("/") and spec.python.endswith("venv/bin/python")


def test_a_failed_engine_start_is_reported_in_the_engines_own_words() -> None:
    serve_message = """The deployment failed to start 1 times in a row. Error:
Traceback (most recent call last):
  File "arg_utils.py", line 1809, in create_model_config
    return ModelConfig(
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, User-specified max_model_len (100000) is greater than the derived max_model_len. [type=value_error]
    For further information visit https://errors.pydantic.dev/2.14/v/value_error"""
    assert engine_reason(serve_message) == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig Value error, "
        "User-specified max_model_len (100000) is greater than the derived max_model_len."
    )
    assert engine_reason("RuntimeError: engine core died\n") == "RuntimeError: engine core died"
    assert engine_reason("no error line here\nlast words") == "last words"


def test_sglang_replica_runs_its_own_server_with_our_parallelism() -> None:
    spec = SGLangSpec(
        backend="sglang",
        model="qwen",
        model_source="/models/qwen2.5-7b",
        tensor_parallel_size=4,
        max_model_len=4096,
        min_replicas=2,
        max_replicas=6,
        engine_kwargs={"mem_fraction_static": 0.8},
    )
    cmd = sglang_command(spec.model_dump(mode="json"), 30001)
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert flags == {
        "--model-path": "/models/qwen2.5-7b",
        "--served-model-name": "qwen",
        "--host": "127.0.0.1",
        "--port": "30001",
        "--tp-size": "4",
        "--pp-size": "1",
        "--context-length": "4096",
        "--mem-fraction-static": "0.8",
    }
    options = sglang_deployment_options(spec)
    assert options["ray_actor_options"]["num_gpus"] == 4
    assert options["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 6}


def test_vllm_without_the_engine_installed_is_one_clear_error(ray_cluster, tmp_path) -> None:
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 2)
    result = run_matrix(
        [
            "run",
            "natural_reasoning",
            "--input",
            str(src),
            "--output",
            str(tmp_path / "out"),
            "llm=vllm",
            "llm.model=some/model",
        ],
        ray_cluster.env,
    )
    assert result.returncode == 2
    assert "backend 'vllm' needs its engine installed on the cluster" in result.stderr
    assert "Traceback" not in result.stderr
