"""Airflow as it runs in production: API server, scheduler, DAG processor and triggerer on PostgreSQL.

Covers what needs the whole system: a backfill over three corpus snapshots (three Ray jobs, three
outputs) and the Matrix UI view rendered by headless Chromium from the running API server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from matrix_provider.hooks.ray_jobs import MatrixRayHook
from tests.conftest import REPO, VENV_BIN, AirflowEnv, free_port, wait_port
from tests.corpus import write_jsonl
from tests.postgres import running_postgres

DATES = ["2026-03-01", "2026-03-02", "2026-03-03"]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def services(airflow_env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("snapshots")
    for i, date in enumerate(DATES):
        write_jsonl(root / "in" / date / "docs.jsonl", 15, start=100 * i)
    port = free_port()
    env = {
        **airflow_env.env,
        "MATRIX_CORPUS_ROOT": str(root / "in"),
        "MATRIX_OUTPUT_ROOT": str(root / "out"),
        "MATRIX_CURATION_RETRIES": "0",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": "matrix-test-jwt-secret-" + "x" * 16,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
    }
    with running_postgres(free_port()) as db_url:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = db_url
        migrate = AirflowEnv(airflow_env.home, env).airflow("db", "migrate", timeout=300)
        assert migrate.returncode == 0, migrate.stderr[-3000:]
        yield from _services(env, port, airflow_env.home, tmp_path_factory.mktemp("airflow-logs"), root)


def _services(env: dict, port: int, home: Path, logs: Path, root: Path) -> Iterator[dict]:
    """Start the four Airflow services; yield what the tests need; stop them."""
    commands = {
        "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(port)],
        # --skip-serve-logs: Airflow's log servers bind every interface; tests bind 127.0.0.1 only.
        "scheduler": ["scheduler", "--skip-serve-logs"],
        "dag-processor": ["dag-processor"],
        "triggerer": ["triggerer", "--skip-serve-logs"],
    }
    procs = {}
    for name, args in commands.items():
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        procs[name] = subprocess.Popen(
            [str(VENV_BIN / "airflow"), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,
        )
    try:
        wait_port(port, timeout=180)
        yield {"env": env, "url": f"http://127.0.0.1:{port}", "root": root, "logs": logs, "home": home}
    finally:
        for proc in procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _airflow(services: dict, *args: str) -> subprocess.CompletedProcess[str]:
    return AirflowEnv(services["home"], services["env"]).airflow(*args, timeout=300)


def _wait_parsed(services: dict, dag_id: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while dag_id not in _airflow(services, "dags", "list", "-o", "plain").stdout:
        assert time.monotonic() < deadline, f"{dag_id} never parsed"
        time.sleep(3)


def _logs_tail(services: dict) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in services["logs"].glob("*.log"))


def test_backfill_over_three_snapshots_runs_three_jobs(services, ray_cluster, monkeypatch) -> None:
    _wait_parsed(services, "matrix_curation")
    result = _airflow(
        services, "backfill", "create", "--dag-id", "matrix_curation", "--from-date", DATES[0], "--to-date", DATES[-1]
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # New DAGs start paused and the scheduler runs no backfill of a paused DAG. Unpausing also adds
    # the latest scheduled run (catchup=False); the assertions below count only the backfill's jobs.
    assert _airflow(services, "dags", "unpause", "matrix_curation").returncode == 0
    deadline = time.monotonic() + 900
    while True:
        out = _airflow(services, "dags", "list-runs", "matrix_curation", "-o", "json").stdout
        runs = json.loads(next((ln for ln in reversed(out.splitlines()) if ln.startswith("[")), "[]"))
        states = {r["logical_date"][:10]: r["state"] for r in runs if r["run_id"].startswith("backfill")}
        if all(states.get(d) in ("success", "failed") for d in DATES):
            break
        assert time.monotonic() < deadline, f"backfill not done: {states}\n{_logs_tail(services)}"
        time.sleep(5)
    assert all(states[d] == "success" for d in DATES), f"{states}\n{_logs_tail(services)}"
    for i, date in enumerate(DATES):
        out = services["root"] / "out" / date
        assert (out / "_SUCCESS").exists()
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["rows_in"] == 15 and manifest["rows_out"] == 15
        assert manifest["input"].endswith(f"/{date}/"), manifest["input"]
        del i
    monkeypatch.setenv("AIRFLOW_CONN_MATRIX_RAY_DEFAULT", services["env"]["AIRFLOW_CONN_MATRIX_RAY_DEFAULT"])
    jobs = [
        j
        for j in MatrixRayHook().list_jobs()
        if (j.get("metadata") or {}).get("airflow_dag_id") == "matrix_curation"
        and "backfill" in (j.get("metadata") or {}).get("airflow_run_id", "")
    ]
    assert len(jobs) == 3, [j.get("submission_id") for j in jobs]


def test_matrix_view_renders_in_chromium(services) -> None:
    base = services["url"]
    page = httpx.get(f"{base}/matrix/", timeout=30)
    assert page.status_code == 200, page.text[:500]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "matrix-ui.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={services['home']}/chr",
    ]
    chromium = shutil.which("chromium") or "chromium"
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", f"{base}/matrix/"], capture_output=True, text=True, timeout=120
    ).stdout
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1900,520", f"{base}/matrix/"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert "Matrix pipeline runs" in dom
    assert "matrix_curation" in dom and "SUCCEEDED" in dom
    assert ">15<" in dom, "a finished run's row count must be on the page"
    assert "Ray job" in dom
    assert shot.exists() and shot.stat().st_size > 5000
    plugins = httpx.get(f"{base}/api/v2/plugins", timeout=30)
    if plugins.status_code == 200:
        names = [v["name"] for p in plugins.json()["plugins"] for v in p.get("external_views", [])]
        assert "Matrix runs" in names
