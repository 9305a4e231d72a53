"""Airflow as it runs in production: API server, scheduler, DAG processor and triggerer on PostgreSQL.

Covers what needs the whole system: a backfill over two corpus snapshots (two Ray jobs, two
outputs) while Ray's dashboard is unreachable for 20 s; a manual run without a logical date, then
cleared after its overrides changed (a new Ray job); a mapped team DAG whose tasks emit asset
events; and the Matrix UI view behind Airflow's auth manager (401 without credentials, 403 for a
DAG the user may not read), rendered by headless Chromium for a mapped and an unmapped task.

Airflow reaches Ray through a proxy (tests/fault_proxy.py) that the outage test takes down.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from matrix_provider.hooks.ray_jobs import MatrixRayHook, RayJobsError
from tests.conftest import CORPUS, REPO, VENV_BIN, AirflowEnv, free_port, wait_port
from tests.corpus import write_jsonl
from tests.fault_proxy import FaultProxy
from tests.postgres import running_postgres
from tests.slurm import assert_nothing_left

DATES = ["2026-03-01", "2026-03-02"]
ARTIFACTS = REPO / "test-artifacts"


USERS = {"admin": "admin-pw", "outsider": "outsider-pw"}


@pytest.fixture(scope="module")
def services(airflow_env, ray_cluster, slurm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("snapshots")
    # A manual run without a logical date reads today's snapshot, as does the run that unpausing
    # schedules (its logical date is today's midnight). A session that crosses midnight (UTC) needs
    # tomorrow's too.
    now = datetime.now(UTC)
    days = [now.date().isoformat(), (now + timedelta(days=1)).date().isoformat()]
    for i, date in enumerate([*DATES, *days]):
        write_jsonl(root / "in" / date / "docs.jsonl", 15, start=100 * i)
    write_jsonl(root / "team" / "shard-0" / "docs.jsonl", 10, start=900)
    port = free_port()
    passwords = root / "passwords.json"
    passwords.write_text(json.dumps(USERS))
    with FaultProxy(ray_cluster.dashboard_url, fail_first=0, method=None, path_regex=r"^$") as proxy:
        conn = json.loads(airflow_env.env["AIRFLOW_CONN_MATRIX_RAY_DEFAULT"])
        conn["port"] = int(proxy.endpoint.rsplit(":", 1)[1])
        env = _env(airflow_env.env, port, root, passwords) | {"AIRFLOW_CONN_MATRIX_RAY_DEFAULT": json.dumps(conn)}
        env |= _slurm_env(slurm.env["SLURM_CONF"], root)
        with running_postgres(free_port()) as db_url, pytest.MonkeyPatch.context() as patch:
            patch.setenv("AIRFLOW_CONN_RAY_DIRECT", airflow_env.env["AIRFLOW_CONN_MATRIX_RAY_DEFAULT"])
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = db_url
            AirflowEnv(airflow_env.home, env).prepare()
            for running in _services(env, port, airflow_env.home, tmp_path_factory.mktemp("airflow-logs"), root):
                yield running | {"proxy": proxy, "days": days}


def _env(base: dict, port: int, root: Path, passwords: Path) -> dict[str, str]:
    return {
        **base,
        "PYTHONPATH": str(REPO),  # the test auth manager (tests/airflow_auth.py)
        "MATRIX_CORPUS_ROOT": str(root / "in"),
        "MATRIX_OUTPUT_ROOT": str(root / "out"),
        "MATRIX_CURATION_RETRIES": "0",
        "MATRIX_TEAM_SNAPSHOT": str(root / "team"),
        "MATRIX_TEAM_OUTPUT": str(root / "team-out"),
        "MATRIX_TEAM_LLM": "sim",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": "matrix-test-jwt-secret-" + "x" * 16,
        "AIRFLOW__CORE__AUTH_MANAGER": "tests.airflow_auth.PerDagAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,outsider:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
    }


def _slurm_env(slurm_conf: str, root: Path) -> dict[str, str]:
    """`matrix_slurm_curation` on the test SLURM: one node, a slow simulator (a run lasts minutes)."""
    slow = {"llm": "sim", "llm.decode_s_per_token": 0.05, "llm.output_tokens_mean": 40}
    return {
        "SLURM_CONF": slurm_conf,
        "MATRIX_CLUSTER_DIR": str(root / "clusters"),
        "MATRIX_SLURM_NODES": "1",
        "MATRIX_SLURM_CPUS": "2",
        "MATRIX_SLURM_TIME": "0:20:00",
        "MATRIX_SLURM_WAIT_S": "180",
        "MATRIX_SLURM_INPUT": str(CORPUS),
        "MATRIX_SLURM_OUTPUT": str(root / "slurm-out"),
        "MATRIX_SLURM_OVERRIDES": json.dumps(slow),
    }


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


def test_backfill_over_two_snapshots_survives_a_20s_dashboard_outage(services) -> None:
    _wait_parsed(services, "matrix_curation")
    result = _airflow(
        services, "backfill", "create", "--dag-id", "matrix_curation", "--from-date", DATES[0], "--to-date", DATES[-1]
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # New DAGs start paused and the scheduler runs no backfill of a paused DAG. Unpausing also adds
    # the latest scheduled run (catchup=False); the assertions below count only the backfill's jobs.
    assert _airflow(services, "dags", "unpause", "matrix_curation").returncode == 0
    deadline = time.monotonic() + 300
    while not _triggers_running(services):  # a triggerer has picked up a curation task's trigger
        assert time.monotonic() < deadline, f"no trigger running\n{_logs_tail(services)}"
        time.sleep(1)
    with services["proxy"].outage():  # Airflow cannot reach Ray's dashboard for 20 s mid-run
        time.sleep(20)
    deadline = time.monotonic() + 900
    while True:
        out = _airflow(services, "dags", "list-runs", "matrix_curation", "-o", "json").stdout
        runs = json.loads(next((ln for ln in reversed(out.splitlines()) if ln.startswith("[")), "[]"))
        states = {r["logical_date"][:10]: r["state"] for r in runs if r["run_id"].startswith("backfill")}
        # Also the run unpausing scheduled (today's): the manual run below must not race it for its output.
        if all(r["state"] in ("success", "failed") for r in runs) and all(states.get(d) for d in DATES):
            break
        assert time.monotonic() < deadline, f"backfill not done: {states}\n{_logs_tail(services)}"
        time.sleep(5)
    assert all(states[d] == "success" for d in DATES), f"{states}\n{_logs_tail(services)}"
    for date in DATES:
        out = services["root"] / "out" / date
        assert (out / "_SUCCESS").exists()
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["rows_in"] == 15 and manifest["rows_out"] == 15
        assert manifest["input"].endswith(f"/{date}/"), manifest["input"]
    jobs = [
        j for j in _jobs(services, airflow_dag_id="matrix_curation") if "backfill" in j["metadata"]["airflow_run_id"]
    ]
    assert len(jobs) == len(DATES), [j.get("submission_id") for j in jobs]
    logs = _task_logs(services, "matrix_curation")
    assert "unavailable for" in logs, "a trigger rode out the outage and said so"
    assert "[matrix] progress" in logs, "the job's progress lines reach the task log"


def test_manual_run_then_clear_after_changed_overrides_runs_a_new_job(services) -> None:
    """A run with no logical date renders its dates; a clear after the work changed is new work."""
    admin = _client(services, "admin")
    _wait_parsed(services, "matrix_team_pipelines")
    assert admin.patch("/api/v2/dags/matrix_team_pipelines", json={"is_paused": False}).status_code == 200
    curation = _trigger(admin, "matrix_curation")
    team = _trigger(admin, "matrix_team_pipelines")
    services["runs"] = {"matrix_curation": curation, "matrix_team_pipelines": team}
    assert _wait_run(services, admin, "matrix_curation", curation) == "success"
    day = datetime.now(UTC).date().isoformat()  # the run's: the session may have crossed midnight since
    out = services["root"] / "out" / (day if day in services["days"] else services["days"][0])
    assert json.loads((out / "_manifest.json").read_text())["rows_in"] == 15, "read today's snapshot"
    assert _airflow(services, "variables", "set", "matrix_llm_timeout_s", "61").returncode == 0
    cleared = admin.post(
        "/api/v2/dags/matrix_curation/clearTaskInstances",
        json={"dry_run": False, "dag_run_id": curation, "task_ids": ["curate"], "only_failed": False},
    )
    assert cleared.status_code == 200, cleared.text
    time.sleep(3)
    assert _wait_run(services, admin, "matrix_curation", curation) == "success"
    jobs = _jobs(services, airflow_dag_id="matrix_curation", airflow_run_id=curation)
    assert len({j["submission_id"] for j in jobs}) == 2 and {j["status"] for j in jobs} == {"SUCCEEDED"}, jobs
    assert _wait_run(services, admin, "matrix_team_pipelines", team) == "success"
    events = admin.get("/api/v2/assets/events", params={"source_dag_id": "matrix_team_pipelines"}).json()
    mapped = [e for e in events["asset_events"] if e["source_task_id"] in ("curate_strict", "curate_lenient")]
    assert {(e["source_task_id"], e["source_map_index"]) for e in mapped} == {
        ("curate_strict", 0),
        ("curate_lenient", 0),
    }, "mapped tasks must emit their asset events"
    alias = admin.get("/api/v2/assets/events", params={"source_dag_id": "matrix_curation"}).text
    assert f"file://{out}" in alias, "the curated snapshot's own folder is an asset (through the alias)"


def test_matrix_view_is_behind_auth_and_renders_mapped_and_unmapped_tasks(services) -> None:
    runs = services["runs"]
    unmapped = f"/matrix/ti/matrix_curation/{quote(runs['matrix_curation'])}/curate/{{MAP_INDEX}}"
    mapped = f"/matrix/ti/matrix_team_pipelines/{quote(runs['matrix_team_pipelines'])}/curate_strict/0"
    anonymous = httpx.Client(base_url=services["url"], timeout=30)
    assert anonymous.get("/matrix/").status_code == 401
    assert anonymous.get(unmapped).status_code == 401
    outsider = _client(services, "outsider")
    assert outsider.get(unmapped).status_code == 403
    listing = outsider.get("/matrix/")
    assert listing.status_code == 200 and "matrix_team_pipelines" in listing.text
    assert "matrix_curation" not in listing.text, "rows of DAGs the user may not read are not listed"
    ARTIFACTS.mkdir(exist_ok=True)
    with _Chromium(services["home"]) as browser:
        browser.sign_in(services["url"], _token(services, "admin"))
        pages = {
            name: browser.open(services["url"] + path)
            for name, path in [("list", "/matrix/"), ("unmapped", unmapped), ("mapped", mapped)]
        }
        browser.screenshot(ARTIFACTS / "matrix-ui.png", services["url"] + "/matrix/")
    assert "Matrix pipeline runs" in pages["list"] and "matrix_curation" in pages["list"]
    assert "SUCCEEDED" in pages["unmapped"] and ">15<" in pages["unmapped"], pages["unmapped"][-1500:]
    assert "curate_strict" in pages["mapped"] and ">10<" in pages["mapped"] and "[0]" in pages["mapped"]
    assert all("Ray job" in dom for dom in pages.values())
    assert (ARTIFACTS / "matrix-ui.png").stat().st_size > 5000
    plugins = _client(services, "admin").get("/api/v2/plugins")
    names = [v["name"] for p in plugins.json()["plugins"] for v in p.get("external_views", [])]
    assert "Matrix runs" in names


# -- helpers ----------------------------------------------------------------------------------------
def test_a_run_marked_failed_still_tears_its_slurm_cluster_down(services) -> None:
    # The pipeline runs on the SLURM cluster its setup brought up; an operator marks the run failed
    # through the API. Airflow still runs the teardown: SLURM lists no job, no process of it is left.
    _wait_parsed(services, "matrix_slurm_curation")
    assert _airflow(services, "dags", "unpause", "matrix_slurm_curation").returncode == 0
    client = _client(services, "admin")
    run_id = _trigger(client, "matrix_slurm_curation")
    clusters = Path(services["env"]["MATRIX_CLUSTER_DIR"])
    deadline = time.monotonic() + 300
    while not (info := _cluster_running_a_job(clusters)):
        assert time.monotonic() < deadline, f"no pipeline job ran on a SLURM cluster\n{_logs_tail(services)}"
        time.sleep(2)
    resp = client.patch(f"/api/v2/dags/matrix_slurm_curation/dagRuns/{quote(run_id)}", json={"state": "failed"})
    assert resp.status_code == 200, resp.text
    task = f"/api/v2/dags/matrix_slurm_curation/dagRuns/{quote(run_id)}/taskInstances/cluster_down"
    deadline = time.monotonic() + 180
    while client.get(task).json().get("state") != "success":
        assert time.monotonic() < deadline, f"teardown never succeeded\n{_logs_tail(services)}"
        time.sleep(2)
    assert_nothing_left(services["env"], info, timeout=60)


def _cluster_running_a_job(clusters: Path) -> dict | None:
    """The state of a cluster under `clusters` on which a Ray job runs, else None."""
    for state in clusters.glob("*/cluster.json"):
        info = json.loads(state.read_text())
        if info.get("dashboard_url"):
            with contextlib.suppress(RayJobsError):
                if any(j["status"] == "RUNNING" for j in MatrixRayHook(cluster=info, retry_s=0).list_jobs()):
                    return info
    return None


def _jobs(services: dict, **metadata: str) -> list[dict]:
    """Ray jobs whose metadata match, asked of Ray directly (not through the proxy Airflow uses)."""
    jobs = MatrixRayHook("ray_direct").list_jobs()
    return [j for j in jobs if all((j.get("metadata") or {}).get(k) == v for k, v in metadata.items())]


def _triggers_running(services: dict) -> int:
    """Triggers a triggerer has picked up (so they poll Ray now), from Airflow's metadata database."""
    return int(
        AirflowEnv(services["home"], services["env"])
        .python(
            "from sqlalchemy import func, select\n"
            "from airflow.models.trigger import Trigger\n"
            "from airflow.utils.session import create_session\n"
            "with create_session() as s:\n"
            "    print(s.scalar(select(func.count()).select_from(Trigger).where(Trigger.triggerer_id.is_not(None))))"
        )
        .split()[-1]
    )


def _task_logs(services: dict, dag_id: str) -> str:
    return "".join(p.read_text() for p in (services["home"] / "logs" / f"dag_id={dag_id}").rglob("*.log"))


def _token(services: dict, user: str) -> str:
    resp = httpx.post(services["url"] + "/auth/token", json={"username": user, "password": USERS[user]}, timeout=30)
    assert resp.status_code == 201, resp.text
    return resp.json()["access_token"]


def _client(services: dict, user: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {_token(services, user)}"}
    return httpx.Client(base_url=services["url"], headers=headers, timeout=60)


def _trigger(client: httpx.Client, dag_id: str) -> str:
    resp = client.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None})
    assert resp.status_code == 200, resp.text
    return resp.json()["dag_run_id"]


def _wait_run(services: dict, client: httpx.Client, dag_id: str, run_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while (state := client.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id)}").json()["state"]) not in (
        "success",
        "failed",
    ):
        assert time.monotonic() < deadline, f"{dag_id} {run_id} still {state}\n{_logs_tail(services)}"
        time.sleep(3)
    return state


class _Chromium:
    """Headless Chromium driven through chromedriver's W3C WebDriver API (plain HTTP, no client library)."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--window-size=1900,600",
    )

    def __init__(self, home: Path) -> None:
        self.home = home

    def __enter__(self) -> _Chromium:
        port = free_port()
        self.proc = subprocess.Popen(
            [shutil.which("chromedriver") or "chromedriver", f"--port={port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(port, timeout=60)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        options = {
            "binary": shutil.which("chromium") or "chromium",
            "args": [*self.FLAGS, f"--user-data-dir={self.home}/chr-{port}"],
        }
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
        self.session = "/session/" + self.http.post("/session", json=caps).json()["value"]["sessionId"]
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(httpx.HTTPError):
            self.http.delete(self.session)
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def sign_in(self, base: str, token: str) -> None:
        """As the Airflow UI does after a login: its JWT in the `_token` cookie of the API server's origin."""
        self.http.post(self.session + "/url", json={"url": base + "/api/v2/version"})
        cookie = {"name": "_token", "value": token, "path": "/"}
        assert self.http.post(self.session + "/cookie", json={"cookie": cookie}).status_code == 200

    def open(self, url: str) -> str:
        self.http.post(self.session + "/url", json={"url": url})
        return self.http.get(self.session + "/source").json()["value"]

    def screenshot(self, path: Path, url: str) -> None:
        self.open(url)
        path.write_bytes(base64.b64decode(self.http.get(self.session + "/screenshot").json()["value"]))
