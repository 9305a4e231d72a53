"""The Airflow side against real Airflow 3.3 and a real `ray start` head with token auth on."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from matrix_provider.hooks.ray_jobs import MatrixRayHook
from matrix_provider.operators import MatrixPipelineOperator
from matrix_provider.operators.pipeline import submission_id_for
from matrix_provider.triggers.ray_job import MatrixRayJobTrigger
from tests.conftest import CORPUS
from tests.corpus import write_jsonl

SIM = {"llm": "sim", "llm.decode_s_per_token": 0.002, "llm.output_tokens_mean": 16}
SLOW_SIM = {"llm": "sim", "llm.decode_s_per_token": 0.2, "llm.output_tokens_mean": 20, "llm.slots": 2}


@pytest.fixture
def conn_env(airflow_env, monkeypatch):
    """The test process sees the same `matrix_ray_default` connection as the Airflow under test."""
    monkeypatch.setenv("AIRFLOW_CONN_MATRIX_RAY_DEFAULT", airflow_env.env["AIRFLOW_CONN_MATRIX_RAY_DEFAULT"])
    return airflow_env


def _slow_operator(task_id: str, tmp_path: Path, **kw) -> MatrixPipelineOperator:
    """An operator whose job runs long enough (a slow simulator) to act on it while it runs."""
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 40)
    return MatrixPipelineOperator(
        task_id=task_id,
        pipeline="natural_reasoning",
        input_uri=str(src),
        output_uri=str(tmp_path / "out"),
        overrides=SLOW_SIM,
        concurrency=4,
        **kw,
    )


def _context(dag_id: str, task_id: str, run_id: str, map_index: int = -1):
    ti = SimpleNamespace(
        dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index, xcom_push=lambda **kw: None
    )
    return {"ti": ti}


def _xcom(airflow_env, dag_id: str, key: str = "return_value") -> object:
    out = airflow_env.python(f"""
import json
from sqlalchemy import select
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
with create_session() as s:
    row = s.scalars(select(XComModel).where(XComModel.dag_id == {dag_id!r}, XComModel.key == {key!r})
                    .order_by(XComModel.timestamp.desc())).first()
    print(json.dumps(XComModel.deserialize_value(row) if row else None))
""")
    return json.loads(out.strip().splitlines()[-1])


def test_provider_is_registered(airflow_env) -> None:
    result = airflow_env.airflow("providers", "list")
    assert "matrix-provider" in result.stdout, result.stderr[-2000:]
    info = airflow_env.python("""
from airflow.providers_manager import ProvidersManager
pm = ProvidersManager()
print(pm.hooks["matrix_ray"].hook_class_name)
print(sorted(k for k in pm.connection_form_widgets if k.startswith("extra__matrix_ray__")))
print(sorted(pm.extra_links_class_names))
""")
    assert "matrix_provider.hooks.ray_jobs.MatrixRayHook" in info
    assert "extra__matrix_ray__grafana_url" in info
    assert "matrix_provider.links.ray.RayJobLink" in info


def test_dags_import_cleanly(airflow_env) -> None:
    out = airflow_env.python(r"""
import warnings
warnings.simplefilter("error")
# Airflow's own standard provider (behind @task.sensor) imports an API its core deprecated: not ours.
warnings.filterwarnings("ignore", module=r"airflow\.providers\.standard\.")
from airflow.dag_processing.dagbag import DagBag
bag = DagBag()
print(sorted(bag.dag_ids)); print(bag.import_errors)
""")
    assert "'matrix_curation'" in out and "'matrix_team_pipelines'" in out
    assert out.strip().endswith("{}"), out


def test_curation_dag_runs_end_to_end(airflow_env, tmp_path: Path) -> None:
    corpus_root, output_root = tmp_path / "snapshots", tmp_path / "curated"
    shutil.copytree(CORPUS, corpus_root / "2026-02-03")
    env = {**airflow_env.env, "MATRIX_CORPUS_ROOT": str(corpus_root), "MATRIX_OUTPUT_ROOT": str(output_root)}
    airflow_env.env, saved = env, airflow_env.env
    try:
        result = airflow_env.airflow("dags", "test", "matrix_curation", "2026-02-03")
    finally:
        airflow_env.env = saved
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # (The trigger's progress lines in the task log are checked by the whole-system test: `dags test`
    # runs the trigger inline, outside the task's log.)
    out = output_root / "2026-02-03"
    assert (out / "_SUCCESS").exists()
    manifest = _xcom(airflow_env, "matrix_curation")
    assert manifest["rows_in"] == 240 and manifest["output"] == f"{out}/"
    assert manifest["rows_ok"] + manifest["rows_filtered"] + manifest["rows_error"] == 240


def test_failing_job_error_text_reaches_the_task_log(airflow_env, tmp_path: Path) -> None:
    # The snapshot has landed (the sensor passes), but the output root lies inside it: the job
    # refuses to run, and its own error line must reach the task log.
    write_jsonl(tmp_path / "in" / "2026-02-04" / "docs.jsonl", 5)
    env = {
        **airflow_env.env,
        "MATRIX_CORPUS_ROOT": str(tmp_path / "in"),
        "MATRIX_CURATION_RETRIES": "0",
        "MATRIX_OUTPUT_ROOT": str(tmp_path / "in" / "2026-02-04" / "curated"),
    }
    airflow_env.env, saved = env, airflow_env.env
    try:
        result = airflow_env.airflow("dags", "test", "matrix_curation", "2026-02-04")
    finally:
        airflow_env.env = saved
    log = result.stdout + result.stderr
    assert "FAILED" in log
    assert "matrix: error: " in log and "inside" in log, log[-4000:]


def test_second_execution_attaches_instead_of_submitting(conn_env, tmp_path: Path) -> None:
    op = _slow_operator("reattach", tmp_path)
    hook = MatrixRayHook()
    run_id = f"manual__{time.time()}"
    context = _context("reattach_dag", "reattach", run_id)
    first, job = op.submit_or_attach(hook, context)
    assert job is None
    second, job = op.submit_or_attach(hook, context)
    assert second == first and job is not None and job["status"] in ("PENDING", "RUNNING")
    ours = [j for j in hook.list_jobs() if (j.get("submission_id") or "").startswith(first)]
    assert len(ours) == 1
    hook.stop(first)


def test_kill_stops_the_ray_job(conn_env, tmp_path: Path) -> None:
    op = _slow_operator("killme", tmp_path, deferrable=False, poll_interval=0.5)
    hook = MatrixRayHook()
    context = _context("kill_dag", "killme", f"manual__{time.time()}")
    context["ti"].xcom_push = lambda **kw: None
    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(errors, op.execute, context), daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while op._submission_id is None or (hook.get_job(op._submission_id) or {}).get("status") != "RUNNING":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.5)
    op.on_kill()
    worker.join(timeout=120)
    assert hook.get_job(op._submission_id)["status"] == "STOPPED"
    assert errors and "STOPPED" in str(errors[0])


def test_trigger_round_trip_and_kill(conn_env, tmp_path: Path) -> None:
    import asyncio

    trigger = MatrixRayJobTrigger(
        "sub-1", "matrix_ray_default", poll_interval=2.5, deadline=123.0, outage_since=99.0, last_progress="x"
    )
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    clone = getattr(__import__(module, fromlist=[name]), name)(**kwargs)
    assert clone.serialize() == (path, kwargs)

    op = _slow_operator("trig", tmp_path)
    hook = MatrixRayHook()
    sid, _ = op.submit_or_attach(hook, _context("trig_dag", "trig", f"manual__{time.time()}"))
    asyncio.run(MatrixRayJobTrigger(sid, "matrix_ray_default").on_kill())
    deadline = time.monotonic() + 60
    while hook.get_job(sid)["status"] != "STOPPED":
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_bad_input_fails_at_once_with_the_fix(conn_env, tmp_path: Path, monkeypatch) -> None:
    from airflow.sdk.exceptions import AirflowException

    ctx = _context("bad_dag", "bad", "manual__1")
    empty = MatrixPipelineOperator(
        task_id="bad", pipeline="natural_reasoning", input_uri="  ", output_uri=str(tmp_path)
    )
    with pytest.raises(AirflowException, match="input_uri rendered to an empty value"):
        empty.execute(ctx)
    unknown = MatrixPipelineOperator(task_id="bad", pipeline="nope", input_uri="x", output_uri="y")
    with pytest.raises(AirflowException, match=r"unknown pipeline 'nope'.*natural_reasoning"):
        unknown.execute(ctx)
    op = MatrixPipelineOperator(
        task_id="bad", pipeline="natural_reasoning", input_uri="x", output_uri="y", ray_conn_id="no_such_conn"
    )
    with pytest.raises(AirflowException, match=r"connection 'no_such_conn' not found.*AIRFLOW_CONN_NO_SUCH_CONN"):
        op.execute(ctx)
    conn = json.loads(conn_env.env["AIRFLOW_CONN_MATRIX_RAY_DEFAULT"])
    monkeypatch.setenv("AIRFLOW_CONN_WRONG_TOKEN", json.dumps({**conn, "password": "not-the-token"}))
    with pytest.raises(AirflowException, match="refused the token of connection 'wrong_token'"):
        MatrixPipelineOperator(
            task_id="bad", pipeline="natural_reasoning", input_uri="x", output_uri="y", ray_conn_id="wrong_token"
        ).execute(ctx)
    monkeypatch.setenv("AIRFLOW_CONN_DEAD", json.dumps({**conn, "port": 9, "extra": {"retry_s": 2}}))
    with pytest.raises(
        AirflowException, match=r"dashboard http://127.0.0.1:9 unavailable for [1-9]\d*s \(ConnectError\)"
    ):
        MatrixPipelineOperator(
            task_id="bad", pipeline="natural_reasoning", input_uri="x", output_uri="y", ray_conn_id="dead"
        ).execute(ctx)


def test_submission_ids_are_deterministic_per_task_instance() -> None:
    a = submission_id_for("dag", "task", "run-1", -1, "w")
    assert a == submission_id_for("dag", "task", "run-1", -1, "w")
    others = {
        submission_id_for("dag", "task", "run-2", -1, "w"),
        submission_id_for("dag", "task", "run-1", 3, "w"),
        submission_id_for("dag", "task", "run-1", -1, "other work"),
    }
    assert a not in others and len(others) == 3


def test_entrypoint_holds_no_secret_and_quotes_arguments() -> None:
    op = MatrixPipelineOperator(
        task_id="t",
        pipeline="natural_reasoning",
        input_uri="s3://b/in dir",
        output_uri="s3://b/out",
        overrides={"llm": "sim"},
    )
    entry = op.entrypoint()
    assert "'s3://b/in dir'" in entry and entry.startswith('cd "$(mktemp -d)" && exec matrix run')
    assert "password" not in entry and "token" not in entry


def _capture(errors: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:
        errors.append(exc)
