"""Pipeline specs: YAML composed with Hydra, validated with pydantic.

A spec is either the name of a shipped pipeline (`matrix_provider/pipelines/<name>.yaml`) or a
path to a YAML file. Config groups (`llm`, `io`, `orchestrator`, `resources`) live in
`matrix_provider/conf/` and are on every spec's search path, so a spec's defaults list can say
`- llm: sim` and the command line can say `llm=sim llm.slots=32`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from matrix_provider.errors import SpecError
from matrix_provider.llm.spec import LLMSpec
from matrix_provider.protocol import PIPELINES_DIR, shipped_pipelines
from matrix_provider.sandbox.spec import SandboxSpec

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Fields that change how fast a run goes but not what it writes: left out of config_hash so that
# a rerun with more replicas or partitions still resumes the same output.
OPERATIONAL_KEYS = frozenset(
    {
        "replicas",
        "max_concurrency",
        "num_cpus",
        "num_gpus",
        "resources",
        "step_timeout_s",
        "retries",
        "backoff_s",
        "timeout_s",
        "max_connections",
        "endpoints",
        "app_name",
        "min_replicas",
        "max_replicas",
        "sticky_buckets",
        "orchestrator",
        "run",
        "n_threads",
        "error_rate",
        "timeout_rate",
        "rate_limit_rate",
        "part_rows",
        "flush_interval_s",
        "split_bytes",
        "write_retries",
        "storage_options",
        "pools",
        "pool_size",
        "warm",
        "lease_ttl_s",
        "chain",
        "python",
        "routing",
        "engine_env",
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoleSpec(_Strict):
    replicas: int = Field(1, ge=1, description="actors serving this role")
    max_concurrency: int = Field(256, ge=1, description="messages one actor works on at once")
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")
    step_timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(2, ge=0, description="extra attempts of one step after a failure")
    backoff_s: float = Field(0.2, ge=0)
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's penalty on repeated tokens; keeps small models out of loops"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="role-specific knobs")
    chain: bool = Field(
        True,
        description="share actor processes with the neighbouring roles of equal resources and replicas "
        "(hand-offs become in-process queue puts); false cuts the chain before and after this role",
    )


class OrchestratorSpec(_Strict):
    row_deadline_s: float = Field(1800.0, gt=0, description="a row without a result by then is re-delivered")
    max_deliveries: int = Field(3, ge=1, description="deliveries of one row before it becomes an error row")
    offload_bytes: int = Field(16384, ge=0, description="payloads above this go to the object store; 0 = off")
    audit_interval_s: float = Field(2.0, gt=0, description="how often the run checks that every agent is alive")
    max_hops: int = Field(64, ge=1, description="role steps of one row before a routing loop becomes an error row")
    linger_s: float = Field(
        0.005, ge=0, description="messages to one actor within this long share one Ray call (outbox coalescing)"
    )


class IOSpec(_Strict):
    format: Literal["auto", "jsonl", "parquet", "warc", "wet"] = "auto"
    text_field: str = "text"
    id_field: str = "id"
    max_doc_bytes: int = Field(1_000_000, ge=1, description="larger documents become error rows")
    part_rows: int = Field(1000, ge=1, description="rows per committed Parquet part")
    flush_interval_s: float = Field(10.0, gt=0, description="commit a part at least this often")
    split_bytes: int = Field(
        64 << 20,
        ge=1 << 10,
        description="uncompressed inputs split into units this big (fixed at an output's first run)",
    )
    write_retries: int = Field(6, ge=0, description="extra attempts of a part or commit write, with backoff")
    lease_ttl_s: float = Field(
        60.0, ge=1, description="a run whose lease went this long without a heartbeat may be taken over"
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (S3 endpoint…)")


class ResourcesSpec(_Strict):
    driver_num_cpus: float = Field(0.0, ge=0)
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class RunSpec(_Strict):
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)
    partitions: int = Field(1, ge=1)
    concurrency: int = Field(64, ge=1, description="rows in flight per partition")
    overwrite: bool = False
    progress_every_s: float = Field(
        30.0, gt=0, description="off a terminal, a progress line this often (and at each 1 % of the units)"
    )


class PipelineSpec(_Strict):
    pipeline: str = Field(description="module under matrix_provider.pipelines, or a dotted module path")
    roles: dict[str, RoleSpec]
    orchestrator: OrchestratorSpec = Field(default_factory=OrchestratorSpec)
    io: IOSpec = Field(default_factory=IOSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    llm: LLMSpec
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    params: dict[str, Any] = Field(default_factory=dict, description="pipeline-wide knobs")
    run: RunSpec

    def config_hash(self) -> str:
        """Hash of what decides the output's content (not its speed).

        A sandbox left at its defaults is not hashed, so outputs written before specs had a
        `sandbox` section (and every pipeline that runs no tools) keep their hash and resume.
        """
        semantic = _drop_keys(self.model_dump(mode="json"), OPERATIONAL_KEYS)
        if semantic["sandbox"] == _drop_keys(SandboxSpec().model_dump(mode="json"), OPERATIONAL_KEYS):
            del semantic["sandbox"]
        return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:16]


def _drop_keys(value: Any, keys: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: _drop_keys(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_drop_keys(v, keys) for v in value]
    return value


def resolve_spec_path(spec: str) -> Path:
    """A shipped pipeline name or a YAML path -> the YAML file."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SpecError(f"spec file {spec!r} does not exist")
        return path.resolve()
    shipped = PIPELINES_DIR / f"{spec}.yaml"
    if shipped.is_file():
        return shipped
    raise SpecError(f"unknown pipeline {spec!r}: give a YAML path or one of {', '.join(shipped_pipelines())}")


def compose(spec: str, overrides: list[str], run: dict[str, Any]) -> PipelineSpec:
    """Compose a spec with Hydra and validate it; every failure becomes one SpecError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = resolve_spec_path(spec)
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"override {item!r} is not KEY=VALUE")
    _register_resolvers()
    search = f"hydra.searchpath=[file://{CONF_DIR}]"
    # Dotted keys may name any field of the schema, also ones the YAML leaves at their default:
    # Hydra's `++` adds or sets, and pydantic (extra="forbid") then names any key that does not exist.
    overrides = [f"++{o}" if "." in o.split("=", 1)[0] and not o.startswith(("+", "~")) else o for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            cfg = hydra_compose(config_name=path.stem, overrides=[search, *overrides])
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise SpecError(_hydra_message(exc)) from None
    assert isinstance(data, dict)
    data.pop("hydra", None)
    data["run"] = run
    return validate(data)


def _register_resolvers() -> None:
    """`${vllm_weights:}`: where `matrix vllm-weights` puts the shipped SmolLM2 as HF weights (llm=vllm_cpu)."""
    from omegaconf import OmegaConf

    from matrix_provider.llm import hf_weights

    if not OmegaConf.has_resolver("vllm_weights"):
        OmegaConf.register_new_resolver("vllm_weights", lambda: str(hf_weights.weights_dir(hf_weights.shipped_gguf())))


def _hydra_message(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0]
    full_key = getattr(exc, "full_key", None)
    if first.startswith("Missing mandatory value") and full_key:
        return f"spec key {full_key!r} must be set (e.g. {full_key}=...)"
    return f"bad spec or override: {first}"


def validate(data: dict[str, Any]) -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key {key!r} (check the spelling)")
            else:
                problems.append(f"{key}: {err['msg']}" if key else err["msg"])
        raise SpecError("invalid spec: " + "; ".join(problems)) from None
