"""Ray clusters on a real single-node SLURM (tests/slurm.py), scraped by a real Prometheus.

`matrix cluster up --slurm` starts Ray as batch jobs; a pipeline runs on it through `matrix run`
while `matrix monitor`'s Prometheus scrapes it, and every query of the shipped dashboards must name
a metric that scrape returned. A DAG brings a cluster up and down around a pipeline task; a
cluster cancelled under a running pipeline fails the task with SLURM's account and leaves nothing.
Bad input (no SLURM, a partition that does not exist, a job that never starts) gets one error
with SLURM's reason and cancels what was submitted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from matrix_provider.hooks.ray_jobs import MatrixRayHook
from matrix_provider.operators import (
    MatrixPipelineOperator,
    MatrixSlurmClusterOperator,
    MatrixSlurmClusterTeardownOperator,
)
from tests.conftest import CORPUS, REPO, VENV_BIN, free_port, read_manifest, run_matrix, task_context
from tests.slurm import SlurmCluster, assert_nothing_left, cluster_processes, squeue

DASHBOARDS = REPO / "matrix_provider" / "monitoring" / "dashboards"
# Slow enough that the run spans several scrapes; retries, failed steps and redeliveries happen too
# (a fifth of the calls hang past the row's deadline), so the dashboards' panels for them have data.
SCRAPED_SIM = [
    "llm=sim",
    "llm.decode_s_per_token=0.02",
    "llm.output_tokens_mean=30",
    "llm.error_rate=0.2",
    "llm.timeout_rate=0.2",
    "llm.timeout_s=10",
    "llm.retries=0",
    "orchestrator.row_deadline_s=3",
    "orchestrator.max_deliveries=2",
    "orchestrator.audit_interval_s=0.5",
    "io.part_rows=40",
    # The bundled pages are documentation: datatrove's web-text blocks would leave score and question
    # too few rows for a rate. This test is about metrics, so only our own cheap checks run.
    *(f"params.{b}.enabled=false" for b in ("fineweb_quality", "gopher_quality", "gopher_repetition", "c4_quality")),
]


@pytest.fixture
def env(slurm: SlurmCluster, tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in slurm.env.items() if not k.startswith(("RAY_", "AIRFLOW"))}
    return {**clean, "PATH": f"{VENV_BIN}:{clean['PATH']}", "MATRIX_CLUSTER_DIR": str(tmp_path / "clusters")}


def _up(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return run_matrix(["cluster", "up", "--slurm", "--wait-s", "180", *args], env, timeout=timeout)


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, groupings and functions removed)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    words = [m[1] for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr) if not m[2]]
    keywords = {"by", "without", "on", "ignoring", "and", "or", "unless", "bool", "offset", "group_left", "group_right"}
    return {w for w in words if w not in keywords}


def _dashboard_queries() -> list[str]:
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        queries += [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
        queries += [v["definition"] for v in board["templating"]["list"] if v.get("type") == "query"]
    return queries


def test_metric_names_of_a_query() -> None:
    # The checker below must see through functions, groupings, matchers and ranges.
    expr = 'histogram_quantile(0.95, sum by (role, le) (rate(ray_x_bucket{pipeline=~"$p"}[5m]))) / sum(ray_y)'
    assert _metric_names(expr) == {"ray_x_bucket", "ray_y"}
    assert _metric_names("label_values(ray_matrix_rows_total, pipeline)") == {"ray_matrix_rows_total", "pipeline"}


@pytest.mark.timeout(600)
def test_cluster_on_slurm_runs_a_pipeline_that_prometheus_scrapes(env, tmp_path: Path) -> None:
    # An Airflow worker's secret in the submitter's environment must not reach the nodes; what
    # --export-env names does: Ray's metrics every second (10 s by default) give a short run a rate.
    submitter = {**env, "AIRFLOW__CORE__FERNET_KEY": "sekrit", "RAY_metrics_report_interval_ms": "1000"}
    up = _up(submitter, "--name", "scraped", "--cpus-per-node", "2", "--export-env", "RAY_metrics_report_interval_ms")
    assert up.returncode == 0, up.stderr[-3000:]
    info = json.loads(up.stdout[: up.stdout.rindex("}") + 1])
    assert len(info["jobs"]) == 1 and squeue(env) == [f"{info['jobs'][0]} RUNNING"]
    token_file = Path(info["token_file"])
    assert token_file.stat().st_mode & 0o077 == 0 and token_file.read_text().strip() not in up.stdout + up.stderr
    assert not [env for _, env in cluster_processes(info) if "AIRFLOW__CORE__FERNET_KEY" in env]
    second = _up(env, "--name", "scraped")
    assert second.returncode == 2 and "already up" in second.stderr, second.stderr

    port = free_port()
    monitor = subprocess.Popen(
        [str(VENV_BIN / "matrix"), "monitor", "--name", "scraped", "--port", str(port), "--scrape-interval", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prometheus = f"http://127.0.0.1:{port}/api/v1"

    def scraping() -> bool:
        try:
            targets = httpx.get(f"{prometheus}/targets", timeout=5).json()["data"]["activeTargets"]
        except (httpx.HTTPError, ValueError):
            return False
        return any(t["health"] == "up" for t in targets)

    try:
        # As an operator would: the scrape is live before the run starts, so it sees every series from 0.
        deadline = time.monotonic() + 60
        while not scraping() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert scraping(), "Prometheus never scraped the cluster's metrics agents"
        run_env = {
            **env,
            "RAY_ADDRESS": info["gcs_address"],
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": info["token_file"],
        }
        out = tmp_path / "out"
        args = ["run", "natural_reasoning", "--input", str(CORPUS), "--output", str(out), "--partitions", "2"]
        done = run_matrix([*args, "--concurrency", "24", *SCRAPED_SIM, "--quiet"], run_env, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        assert read_manifest(str(out))["rows_in"] == 240

        def query(promql: str) -> dict[str, float]:
            data = httpx.get(f"{prometheus}/query", params={"query": promql}, timeout=10).json()["data"]["result"]
            return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in data}

        # Ray's agents export every second (see above) and Prometheus scrapes every second. Each role's
        # counters start at 0 when its agent starts, so even a role whose whole share of this short run
        # falls between two scrapes shows a rate on the dashboard's panel.
        tokens_by_role = "sum by (role) (max_over_time(rate(ray_matrix_role_tokens_total[1m])[5m:1s]))"
        deadline = time.monotonic() + 30
        while len(tokens := query(tokens_by_role)) < 3 and time.monotonic() < deadline:
            time.sleep(1)
        totals = query("sum by (role) (max_over_time(ray_matrix_role_tokens_total[5m]))")
        assert tokens.keys() == totals.keys() and min(tokens.values()) > 0, (tokens, totals)
        queues = query("sum by (role) (max_over_time(ray_matrix_role_queue_length[5m]))")
        assert {json.loads(k)["role"] for k in queues} >= {json.loads(k)["role"] for k in tokens}, queues

        labels = {"pipeline", "role", "status", "kind", "partition", "instance", "le", "State"}

        def unscraped() -> dict[str, set[str]]:
            scraped = set(httpx.get(f"{prometheus}/label/__name__/values", timeout=10).json()["data"])
            return {e: m for e in _dashboard_queries() if (m := _metric_names(e) - scraped - labels)}

        deadline = time.monotonic() + 30  # Ray's node metrics come from each node's agent, in its own rhythm
        while (missing := unscraped()) and time.monotonic() < deadline:
            time.sleep(2)
        assert not missing, f"dashboard queries name metrics the scrape never returned: {missing}"
    finally:
        monitor.terminate()
        monitor.wait(timeout=30)
        down = run_matrix(["cluster", "down", "--name", "scraped"], env, timeout=180)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(env, info)
    assert monitor.returncode is not None
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


def _status(env: dict[str, str], name: str) -> dict:
    done = run_matrix(["cluster", "status", "--name", name], env, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.timeout(420)
def test_a_requeued_worker_node_rejoins(env) -> None:
    # Head and a one-task worker array, each a job of one CPU on the single node.
    up = _up(env, "--name", "two", "--nodes", "2", "--cpus-per-node", "1")
    assert up.returncode == 0, up.stderr[-3000:]
    info = json.loads(up.stdout[: up.stdout.rindex("}") + 1])
    head, workers = info["jobs"]
    try:
        assert _status(env, "two")["alive_nodes"] == 2
        # SLURM takes the worker's allocation away and queues it again, as after a preemption.
        subprocess.run(["scontrol", "requeue", workers], env=env, check=True, capture_output=True)
        seen, deadline = [], time.monotonic() + 240
        while time.monotonic() < deadline and not (1 in seen and seen[-1] == 2):
            seen.append(_status(env, "two")["alive_nodes"])
            # SLURM holds a requeued job back ~2 min (reason BeginTime); lift that so the test need not wait.
            if f"{workers}_1 PENDING BeginTime" in squeue(env, "%i %T %r"):
                subprocess.run(["scontrol", "update", f"JobId={workers}_1", "StartTime=now"], env=env, check=True)
            time.sleep(1)
        assert 1 in seen and seen[-1] == 2, f"alive nodes over time: {seen}"
        assert _status(env, "two")["job_states"][head]["state"] == "RUNNING"
    finally:
        down = run_matrix(["cluster", "down", "--name", "two"], env, timeout=180)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(env, info)


def test_bad_requests_get_slurms_reason_and_leave_nothing(env, tmp_path: Path) -> None:
    no_slurm = {**env, "PATH": f"{VENV_BIN}:/usr/local/nonexistent"}
    done = run_matrix(["cluster", "up", "--slurm", "--name", "x"], no_slurm, timeout=60)
    assert done.returncode == 2 and "sbatch" in done.stderr and "--local" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr

    done = _up(env, "--name", "nopart", "--partition", "nope")
    assert done.returncode == 2 and "invalid partition" in done.stderr.lower(), done.stderr
    assert "Traceback" not in done.stderr

    # More CPUs than the node has: SLURM keeps the job pending; `up` gives up with the pending
    # reason, and cancels the job.
    done = run_matrix(
        ["cluster", "up", "--slurm", "--name", "big", "--cpus-per-node", "64", "--wait-s", "8"], env, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "not up after 8 s" in done.stderr and "PENDING" in done.stderr, done.stderr
    assert squeue(env) == []

    # Nodes without Ray (a `ray` that is not there): the head job fails; SLURM's state and the
    # node's own words come back.
    done = _up(env, "--name", "noray", "--ray", "/nonexistent/bin/ray")
    assert done.returncode == 2 and "head job" in done.stderr and "FAILED" in done.stderr, done.stderr
    assert "No module named 'ray'" in done.stderr or "nonexistent" in done.stderr, done.stderr
    assert "Traceback (most recent call last)" not in done.stderr.split("log:")[0]
    assert squeue(env) == []


def _airflow_env(airflow_env, env: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    dags = tmp_path / "dags"
    dags.mkdir(exist_ok=True)
    (dags / "matrix_slurm.py").write_text((REPO / "dags" / "matrix_slurm.py").read_text())
    return {
        **airflow_env.env,
        "SLURM_CONF": env["SLURM_CONF"],
        "MATRIX_CLUSTER_DIR": env["MATRIX_CLUSTER_DIR"],
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "MATRIX_SLURM_NODES": "1",
        "MATRIX_SLURM_CPUS": "2",
        "MATRIX_SLURM_TIME": "0:20:00",
        "MATRIX_SLURM_WAIT_S": "180",
        "MATRIX_SLURM_INPUT": str(CORPUS),
        "MATRIX_SLURM_OUTPUT": str(tmp_path / "curated"),
        **extra,
    }


@pytest.mark.timeout(600)
def test_dag_brings_a_cluster_up_runs_on_it_and_tears_it_down(airflow_env, env, tmp_path: Path) -> None:
    # The CPU-only pipeline: the Airflow side is under test here, not the LLM roles.
    run_env = _airflow_env(airflow_env, env, tmp_path, MATRIX_SLURM_PIPELINE="prefilter", MATRIX_SLURM_DEFERRABLE="0")
    done = subprocess.run(
        [str(VENV_BIN / "airflow"), "dags", "test", "matrix_slurm_curation"],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=540,
        cwd=airflow_env.home,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    outputs = list((tmp_path / "curated").glob("*/_SUCCESS"))
    assert len(outputs) == 1, log[-3000:]
    assert read_manifest(str(outputs[0].parent))["rows_in"] == 240
    (state,) = Path(env["MATRIX_CLUSTER_DIR"]).iterdir()
    info = json.loads((state / "cluster.json").read_text())
    assert Path(info["token_file"]).read_text().strip() not in log  # the token never reaches a log
    assert_nothing_left(env, info)


@pytest.mark.timeout(600)
def test_a_cluster_cancelled_under_a_running_pipeline_fails_the_task_and_leaves_nothing(
    env, tmp_path: Path, monkeypatch
) -> None:
    # The operators as a worker and the triggerer run them (in this process): setup, then the
    # pipeline deferred to its trigger; SLURM cancels the head under the running job.
    for key in ("SLURM_CONF", "MATRIX_CLUSTER_DIR", "PATH"):
        monkeypatch.setenv(key, env[key])
    ctx = task_context("slurm_dag", "curate", "manual__cancel")
    info = MatrixSlurmClusterOperator(task_id="cluster_up", cpus_per_node=2, wait_s=180).execute(ctx)
    run = MatrixPipelineOperator(
        task_id="curate",
        pipeline="natural_reasoning",
        input_uri=str(CORPUS),
        output_uri=str(tmp_path / "out"),
        cluster=info,
        overrides={"llm": "sim", "llm.decode_s_per_token": 0.05, "llm.output_tokens_mean": 40},
        deferrable=True,
        poll_interval=1,
    )
    with pytest.raises(TaskDeferred) as deferred:
        run.execute(ctx)
    trigger = deferred.value.trigger
    hook = MatrixRayHook(cluster=info, retry_s=1)
    deadline = time.monotonic() + 240
    while (hook.get_job(trigger.submission_id) or {}).get("status") != "RUNNING":
        assert time.monotonic() < deadline, "the pipeline's Ray job never ran"
        time.sleep(1)
    time.sleep(3)  # under way, not just started
    subprocess.run(["scancel", info["jobs"][0]], env=env, check=True)

    event = asyncio.run(asyncio.wait_for(anext(trigger.run()), 120)).payload
    gone = f"has ended (slurm: head job {info['jobs'][0]} CANCELLED"
    assert event["status"] == "ERROR" and gone in event["message"], event
    with pytest.raises(AirflowException, match=re.escape(gone)):
        run.execute_complete(ctx, event)
    # A worker polling instead of deferring learns it the same way.
    with pytest.raises(AirflowException, match=re.escape(gone)):
        run._poll(trigger.submission_id, ctx, None)
    assert MatrixSlurmClusterTeardownOperator(task_id="down", cluster=info).execute(ctx) == info["jobs"]
    assert_nothing_left(env, info)


def test_local_cluster_has_the_same_commands(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "MATRIX_CLUSTER_DIR": str(tmp_path / "c"),
        # An Airflow worker's secrets and a stray token must not reach the nodes.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:hunter2@db/airflow",
        "RAY_AUTH_TOKEN": "not-this-clusters-token",
        "MY_BUCKET": "s3://exported",
    }
    args = ["cluster", "up", "--local", "--name", "here", "--nodes", "2", "--cpus-per-node", "1"]
    up = run_matrix([*args, "--export-env", "MY_BUCKET"], env)
    assert up.returncode == 0, up.stderr[-3000:]
    info = json.loads(up.stdout[: up.stdout.rindex("}") + 1])
    try:
        status = json.loads(run_matrix(["cluster", "status", "--name", "here"], env).stdout)
        assert status["alive_nodes"] == 2
        assert {s["state"] for s in status["job_states"].values()} == {"RUNNING"}
        nodes_env = {k: v for _, env in cluster_processes(info) for k, v in env.items()}
        assert nodes_env.get("MY_BUCKET") == "s3://exported"
        assert not {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "RAY_AUTH_TOKEN"} & nodes_env.keys()
    finally:
        down = run_matrix(["cluster", "down", "--name", "here"], env, timeout=120)
    assert down.returncode == 0, down.stderr
    pids = [int(p.split("@")[0]) for job in info["jobs"] for p in job.removeprefix("local:").split(",")]
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert cluster_processes(info) == []
