"""The Helm chart in chart/, rendered by a real Helm (v4 Go SDK from the PyPI wheel helm-python-sdk, run through
`uv run tools/helm_render.py`) and checked: core objects against Kubernetes' own schemas (kubernetes-validate,
strict), RayCluster/RayJob against KubeRay's CRD schemas (chart/crds-schema/), and the content that matters
(token wiring, GPU group, Airflow connection, dashboards, scrape port, errors that name the bad key).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "chart"
RENDER = REPO / "tools" / "helm_render.py"
DASHBOARDS = REPO / "matrix_provider" / "monitoring" / "dashboards"
CRD_SCHEMAS = {
    "RayCluster": CHART / "crds-schema" / "raycluster-v1.json",
    "RayJob": CHART / "crds-schema" / "rayjob-v1.json",
}
RELEASE = "demo"
NAMESPACE = "pipelines"
FULLNAME = "demo-matrix-provider"
HEAD_HOST = f"{FULLNAME}-head-svc.{NAMESPACE}.svc.cluster.local"
APP_VERSION = "0.1.0"
KUBE_VERSION = kubernetes_validate.latest_version()
# Kinds this chart renders that Kubernetes itself defines (and kubernetes-validate ships schemas for).
CORE_KINDS = {"Secret", "ConfigMap", "Service"}


def _uv() -> str:
    found = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    assert Path(found).exists(), "uv not found (the Makefile installs it: make .venv)"
    return found


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run tools/helm_render.py on the chart. The .venv's Python serves as uv's interpreter (helm-python-sdk
    needs >= 3.10); the script's dependencies live in uv's cache, not in .venv."""
    cmd = [_uv(), "run", "--quiet", "--python", sys.executable, str(RENDER), str(CHART)]
    cmd += ["--name", RELEASE, "--namespace", NAMESPACE, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


@functools.cache
def render(*args: str) -> tuple[dict[str, Any], ...]:
    done = helm(*args)
    assert done.returncode == 0, f"helm failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def render_error(*args: str) -> str:
    done = helm(*args)
    assert done.returncode != 0, f"rendering {args} should fail, got:\n{done.stdout[:2000]}"
    return done.stderr


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    return found


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(CRD_SCHEMAS[kind].read_text()))


def pruned_fields(schema: dict[str, Any], node: Any, path: str = "") -> list[str]:
    """Fields the API server would drop silently: not in a structural schema that does not keep unknown fields."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(node, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in node.items():
            if properties is not None and key in properties:
                found += pruned_fields(properties[key], value, f"{path}/{key}")
            elif isinstance(extra, dict):
                found += pruned_fields(extra, value, f"{path}/{key}")
            elif properties is not None and extra is not True:
                found.append(f"{path}/{key}")
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(node):
            found += pruned_fields(schema["items"], item, f"{path}/{i}")
    return found


def validate_all(docs: tuple[dict[str, Any], ...]) -> None:
    """Every object is valid: core kinds for Kubernetes, Ray kinds for KubeRay, nothing left unchecked."""
    for doc in docs:
        kind = doc["kind"]
        where = f"{kind}/{doc['metadata']['name']}"
        if kind in CORE_KINDS:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is not a valid Kubernetes {KUBE_VERSION} object: {exc}")
        elif kind in CRD_SCHEMAS:
            assert doc["apiVersion"] == "ray.io/v1", where
            validator = crd_validator(kind)
            errors = [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
            assert not errors, f"{where} breaks KubeRay's schema:\n" + "\n".join(errors)
            unknown = pruned_fields(validator.schema, doc)
            assert not unknown, f"{where} has fields KubeRay's schema does not know (pruned): {unknown}"
        elif kind == "ServiceMonitor":
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", where
        else:
            pytest.fail(f"{where}: a kind the test does not validate")


def ray_pod_specs(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    return [head] + [g["template"]["spec"] for g in cluster_spec.get("workerGroupSpecs", [])]


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_default_values_render_a_valid_cpu_only_cluster() -> None:
    docs = render()
    validate_all(docs)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "ConfigMap", "RayCluster", "Secret", "Secret"], kinds
    spec = one(docs, "RayCluster", FULLNAME)["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["upscalingMode"] == "Default"
    (cpu,) = spec["workerGroupSpecs"]
    assert (cpu["groupName"], cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == ("cpu-workers", 1, 1, 4)
    for pod in ray_pod_specs(spec):
        (ray,) = pod["containers"]
        assert ray["image"] == f"matrix-provider-runtime:{APP_VERSION}"
        assert "nvidia.com/gpu" not in json.dumps(ray["resources"])
        assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in ray["ports"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["metrics-export-port"] == "8080"
    assert head["rayStartParams"]["dashboard-port"] == "8265"
    head_ports = head["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"} in head_ports


def test_gpu_values_add_a_gpu_worker_group() -> None:
    docs = render("-f", str(CHART / "values-gpu.yaml"))
    validate_all(docs)
    groups = {g["groupName"]: g for g in one(docs, "RayCluster", FULLNAME)["spec"]["workerGroupSpecs"]}
    assert sorted(groups) == ["cpu-workers", "gpu-workers"]
    gpu = groups["gpu-workers"]
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (1, 0, 4)
    (ray,) = gpu["template"]["spec"]["containers"]
    assert ray["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert ray["image"] == f"matrix-provider-runtime:{APP_VERSION}-gpu"
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert toleration in gpu["template"]["spec"]["tolerations"]
    cpu_limits = groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu_limits


@pytest.mark.parametrize("extra", [(), ("-f", str(CHART / "values-gpu.yaml"))], ids=["cpu", "gpu"])
def test_every_ray_container_gets_the_token_from_the_auth_secret(extra: tuple[str, ...]) -> None:
    docs = render(*extra)
    spec = one(docs, "RayCluster", FULLNAME)["spec"]
    secret_name = f"{FULLNAME}-ray-auth"
    assert spec["authOptions"] == {"mode": "token", "secretName": secret_name}
    token = decoded(one(docs, "Secret", secret_name))["auth_token"]
    assert len(token) >= 32
    for pod in ray_pod_specs(spec):
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, container["name"]
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": secret_name, "key": "auth_token"}, container["name"]


def test_airflow_connection_secret_points_at_the_head_with_the_token() -> None:
    docs = render("--set", "auth.token=s3cr3t-token", "--set", "airflowConnection.grafanaUrl=https://grafana.example")
    validate_all(docs)
    secret = one(docs, "Secret", f"{FULLNAME}-airflow-connection")
    (key,) = secret["data"]
    assert key == "AIRFLOW_CONN_MATRIX_RAY_DEFAULT"
    conn = json.loads(decoded(secret)[key])
    assert conn == {
        "conn_type": "matrix_ray",
        "host": HEAD_HOST,
        "port": 8265,
        "password": "s3cr3t-token",
        "extra": {"dashboard_url": f"http://{HEAD_HOST}:8265", "grafana_url": "https://grafana.example"},
    }
    assert decoded(one(docs, "Secret", f"{FULLNAME}-ray-auth")) == {"auth_token": "s3cr3t-token"}


def test_generated_token_is_shared_and_conn_id_names_the_key() -> None:
    docs = render("--set", "airflowConnection.connId=ray_prod")
    conn = json.loads(decoded(one(docs, "Secret", f"{FULLNAME}-airflow-connection"))["AIRFLOW_CONN_RAY_PROD"])
    assert conn["password"] == decoded(one(docs, "Secret", f"{FULLNAME}-ray-auth"))["auth_token"]
    assert "grafana_url" not in conn["extra"]


def test_existing_secret_is_used_and_the_airflow_secret_refused() -> None:
    error = render_error("--set", "auth.existingSecret=ray-token")
    assert "airflowConnection.enabled=false" in error and "ray-token" in error
    docs = render("--set", "auth.existingSecret=ray-token", "--set", "airflowConnection.enabled=false")
    validate_all(docs)
    assert [d["metadata"]["name"] for d in by_kind(docs, "Secret")] == []
    spec = one(docs, "RayCluster", FULLNAME)["spec"]
    assert spec["authOptions"]["secretName"] == "ray-token"
    for pod in ray_pod_specs(spec):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ray-token", "key": "auth_token"}


def test_dashboards_configmap_holds_every_package_dashboard_byte_for_byte() -> None:
    docs = render()
    cm = one(docs, "ConfigMap", f"{FULLNAME}-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {p.name: p.read_bytes().decode() for p in sorted(DASHBOARDS.glob("*.json"))}
    # The chart reads the package's directory through the chart/dashboards symlink: one source.
    assert (CHART / "dashboards").resolve() == DASHBOARDS.resolve()
    assert (cm.get("data") or {}) == files
    for name, text in files.items():
        assert isinstance(json.loads(text), dict), name


def test_scrape_config_targets_the_ray_metrics_port() -> None:
    docs = render()
    cm = one(docs, "ConfigMap", f"{FULLNAME}-prometheus-scrape")
    (job,) = yaml.safe_load(cm["data"]["scrape-config.yaml"])["scrape_configs"]
    relabels = job["relabel_configs"]
    keep = {tuple(r["source_labels"]): r["regex"] for r in relabels if r.get("action") == "keep"}
    assert keep == {
        ("__meta_kubernetes_pod_label_ray_io_cluster",): FULLNAME,
        ("__meta_kubernetes_pod_container_port_number",): "8080",
    }
    address = [r for r in relabels if r.get("target_label") == "__address__"]
    assert address and address[0]["replacement"] == "${1}:8080"
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": [NAMESPACE]}}]


def test_service_monitor_selects_the_metrics_service_of_all_ray_pods() -> None:
    docs = render(
        "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.scrapeConfig.enabled=false",
        "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
    )  # fmt: skip
    validate_all(docs)
    assert [d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")] == [f"{FULLNAME}-dashboards"]
    (monitor,) = by_kind(docs, "ServiceMonitor")
    service = one(docs, "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["selector"] == {"ray.io/cluster": FULLNAME}
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_ray_job_runs_the_pipeline_on_the_charts_cluster() -> None:
    docs = render(
        "--set", "rayJob.enabled=true", "--set", "rayJob.partitions=4", "--set-json", 'rayJob.overrides=["llm=sim"]',
        "--set", "rayJob.input=s3://corpus/in/", "--set", "rayJob.output=s3://corpus/o b/",
    )  # fmt: skip
    validate_all(docs)
    (job,) = by_kind(docs, "RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": FULLNAME}
    assert "rayClusterSpec" not in spec and "shutdownAfterJobFinishes" not in spec
    assert spec["entrypoint"] == (
        "'matrix' 'run' 'natural_reasoning' '--input' 's3://corpus/in/' '--output' 's3://corpus/o b/'"
        " '--partitions' '4' '--concurrency' '64' 'llm=sim'"
    )
    assert by_kind(docs, "RayCluster"), "clusterSelector needs the chart's RayCluster"


def test_ray_job_with_its_own_cluster_shuts_it_down() -> None:
    docs = render(
        "--set", "rayJob.enabled=true", "--set", "rayJob.input=/data/in", "--set", "rayJob.output=/data/out",
        "--set", "rayJob.useClusterSelector=false", "--set", "rayCluster.enabled=false",
        "-f", str(CHART / "values-gpu.yaml"),
    )  # fmt: skip
    validate_all(docs)
    assert not by_kind(docs, "RayCluster")
    (job,) = by_kind(docs, "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 300
    assert "clusterSelector" not in spec
    assert [g["groupName"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]] == ["cpu-workers", "gpu-workers"]
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (("--set", "workers.cpu.replicas=many"), "/workers/cpu/replicas"),
        (("--set-json", 'head.resources.limits.cpu={"cores":2}'), "/head/resources/limits/cpu"),
        (("--set", "metrics.serviceMonitor.enabled=yes-please"), "/metrics/serviceMonitor/enabled"),
        (("--set", "airflowConnection.connId=bad-id"), "/airflowConnection/connId"),
    ],
    ids=["replicas-string", "cpu-object", "bool-string", "conn-id-pattern"],
)
def test_wrong_values_fail_and_name_the_key(args: tuple[str, ...], key: str) -> None:
    error = render_error(*args)
    assert "don't meet the specifications of the schema" in error, error
    assert f"at '{key}'" in error, error


def test_ray_job_without_input_fails_with_a_message() -> None:
    error = render_error("--set", "rayJob.enabled=true")
    assert "rayJob.input and rayJob.output" in error


def test_the_validators_reject_broken_objects() -> None:
    """Guard against vacuous checks: a wrong type, an unknown field, each is caught."""
    docs = render()
    cluster = json.loads(json.dumps(one(docs, "RayCluster", FULLNAME)))
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "many"
    with pytest.raises(AssertionError, match="replicas"):
        validate_all((cluster,))
    cluster = json.loads(json.dumps(one(docs, "RayCluster", FULLNAME)))
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["enviroment"] = []
    with pytest.raises(AssertionError, match="enviroment"):
        validate_all((cluster,))
    secret = dict(one(docs, "Secret", f"{FULLNAME}-ray-auth"), stringdata={})
    with pytest.raises(pytest.fail.Exception, match="stringdata"):
        validate_all((secret,))


@pytest.mark.parametrize("extra", [(), ("-f", str(CHART / "values-gpu.yaml"))], ids=["cpu", "gpu"])
def test_helm_lint_strict_is_clean(extra: tuple[str, ...]) -> None:
    done = helm("--lint", *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ERROR]" not in done.stdout and "[WARNING]" not in done.stdout
