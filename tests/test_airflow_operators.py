"""The Airflow side under faults and re-runs, against the real Ray head (token auth) of the session.

Each test names the defect it guards against. Faults come from a real HTTP proxy in front of
Ray's dashboard (tests/fault_proxy.py): it refuses connections for a while, or answers chosen
paths with HTTP 500, and records every request it forwarded.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from matrix_provider.hooks.ray_jobs import MatrixRayHook, RayJobsError, RayUnavailable
from matrix_provider.operators import MatrixPipelineOperator, MatrixStopJobOperator
from matrix_provider.protocol import PROGRESS_PREFIX, new_progress
from matrix_provider.sensors import MatrixRayJobSensor
from matrix_provider.triggers.ray_job import MatrixRayJobTrigger, first_event
from tests.conftest import read_manifest, task_context
from tests.corpus import write_jsonl
from tests.fault_proxy import FaultProxy

SIM = {"llm": "sim", "llm.decode_s_per_token": 0.002, "llm.output_tokens_mean": 16}


@pytest.fixture
def proxied(conn, monkeypatch):
    """A connection `proxied` to the same dashboard through a fault proxy (short retry window)."""
    upstream = f"http://{conn['host']}:{conn['port']}"
    with FaultProxy(upstream, fail_first=0, method=None, path_regex=r"^$") as proxy:
        port = int(proxy.endpoint.rsplit(":", 1)[1])
        monkeypatch.setenv("AIRFLOW_CONN_PROXIED", json.dumps({**conn, "port": port, "extra": {"retry_s": 3}}))
        yield proxy


def _op(task_id: str, src: Path, out: Path, **kw) -> MatrixPipelineOperator:
    kw.setdefault("overrides", SIM)
    return MatrixPipelineOperator(
        task_id=task_id,
        pipeline="natural_reasoning",
        input_uri=str(src),
        output_uri=str(out),
        deferrable=False,
        poll_interval=1,
        **kw,
    )


def _driver_resources(conn: dict, sid: str) -> dict:
    """What Ray reserved for the job's driver: its supervisor actor's required resources (State API)."""
    import httpx

    resp = httpx.get(
        f"http://{conn['host']}:{conn['port']}/api/v0/actors",
        params={
            "filter_keys": "name",
            "filter_predicates": "=",
            "filter_values": f"_ray_internal_job_actor_{sid}",
            "detail": "true",
        },
        headers={"Authorization": f"Bearer {conn['password']}"},
        timeout=30,
    )
    resp.raise_for_status()
    return resp.json()["data"]["result"]["result"][0]["required_resources"]


def _run_trigger(trigger: MatrixRayJobTrigger) -> dict:
    # Bounded: a job that never ends must fail this test with a reason, not hang it to pytest's timeout.
    return asyncio.run(asyncio.wait_for(first_event(trigger), timeout=300))


def _wait_status(hook: MatrixRayHook, sid: str, statuses: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while (status := (hook.get_job(sid) or {}).get("status")) not in statuses:
        assert time.monotonic() < deadline, f"{sid} still {status}"
        time.sleep(0.5)
    return status


def test_cleared_task_with_changed_work_runs_a_new_job_and_a_retry_reattaches(conn, proxied, tmp_path: Path) -> None:
    """Defects: the id was (dag, task, run, map index) only, so a clear returned the old job's manifest;
    a SUCCEEDED job failed its task when Ray could not serve its log; `check()` listed every job."""
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 12)
    proxied.rule(method="GET", path_regex=r"^/api/v0/logs", fail_first=10**6)
    first = _op("t", src, tmp_path / "out", ray_conn_id="proxied").execute(task_context("rerun_dag", "t", "manual__1"))
    assert proxied.failed > 0, "the log endpoint was asked and failed"
    assert first["rows_in"] == 12 and first["run_id"] == read_manifest(str(tmp_path / "out"))["run_id"]
    assert not [path for method, path, _ in proxied.log if method == "GET" and path == "/api/jobs/"], "no listing"
    # A plain retry of the same work re-attaches: same job, nothing resubmitted.
    again = _op("t", src, tmp_path / "out").execute(task_context("rerun_dag", "t", "manual__1", try_number=2))
    assert again["ray_submission_id"] == first["ray_submission_id"]
    # Changed overrides (an operational knob, so the output resumes): a new Ray job.
    changed = _op("t", src, tmp_path / "out", overrides={**SIM, "llm.timeout_s": 61}, entrypoint_num_cpus=0.5)
    ctx = task_context("rerun_dag", "t", "manual__1")
    second = changed.execute(ctx)
    assert second["ray_submission_id"] != first["ray_submission_id"]
    assert second["rows_resumed"] == 12, "the new job resumes the committed output"
    assert _driver_resources(conn, second["ray_submission_id"]).get("CPU") == 0.5, "driver placement reaches Ray"
    assert ctx["ti"].pushed["matrix_ray_conn_id"] == "matrix_ray_default"
    # Map-index drift: index 0 now means another shard, so another job.
    other = write_jsonl(tmp_path / "in2" / "d.jsonl", 5, start=500)
    ids = {
        _op("t", s, tmp_path / o).submission_id_of(task_context("rerun_dag", "t", "manual__1", map_index=0))
        for s, o in ((src, "o0"), (other, "o0"))
    }
    assert len(ids) == 2
    # New work while older work still runs: the older job is stopped, not left racing for the output.
    hook = MatrixRayHook()
    older, _ = _op("t", other, tmp_path / "race").submit_or_attach(hook, task_context("race_dag", "t", "r"))
    newer, _ = _op("t", other, tmp_path / "race", overrides={**SIM, "llm.timeout_s": 62}).submit_or_attach(
        hook, task_context("race_dag", "t", "r", try_number=2)
    )
    assert newer != older and _wait_status(hook, older, {"STOPPED", "SUCCEEDED", "FAILED"}) == "STOPPED"
    hook.stop(newer)
    # force_rerun: every try is a new job.
    forced = {
        _op("t", src, tmp_path / "out", force_rerun=True).submission_id_of(task_context("d", "t", "r", try_number=n))
        for n in (1, 2)
    }
    assert len(forced) == 2


def test_trigger_rides_out_a_dashboard_outage_and_fails_clearly_past_its_budget(conn, proxied) -> None:
    """Defect: any hook error fired an error event, so one network blip failed the task."""
    hook = MatrixRayHook("proxied")
    sid = _sleeping_job(hook, 25)
    _wait_status(hook, sid, {"RUNNING"})
    # Down past a 4 s budget: ERROR names the URL and the outage, and the job is left running.
    with proxied.outage():
        event = _run_trigger(MatrixRayJobTrigger(sid, "proxied", poll_interval=1, outage_budget_s=4))
    assert event["status"] == "ERROR", event
    assert f"{proxied.endpoint} unavailable" in event["message"] and "gave up after" in event["message"]
    assert hook.get_job(sid)["status"] == "RUNNING", "the Ray job must not be orphaned or killed by an outage"
    # Down for 8 s within a generous budget: the trigger waits it out and reports the job's end.
    outage = threading.Thread(target=_down_for, args=(proxied, 8.0), daemon=True)
    outage.start()
    event = _run_trigger(MatrixRayJobTrigger(sid, "proxied", poll_interval=1, outage_budget_s=120))
    outage.join()
    assert event["status"] == "SUCCEEDED", event
    assert any(status == 200 for _, _, status in proxied.log[-3:]), "the proxy came back and served the end"


def test_cancel_on_kill_false_leaves_the_job_for_a_retry(conn) -> None:
    """Defect: no switch: a worker's SIGTERM on eviction (a kill to Airflow) stopped a job a retry
    could have re-attached to."""
    hook = MatrixRayHook()
    sid = _sleeping_job(hook, 60)
    try:
        _wait_status(hook, sid, {"RUNNING"})
        asyncio.run(MatrixRayJobTrigger(sid, "matrix_ray_default", cancel_on_kill=False).on_kill())
        op = MatrixPipelineOperator(
            task_id="t", pipeline="prefilter", input_uri="in", output_uri="out", cancel_on_kill=False
        )
        op._submission_id = sid
        op.on_kill()
        time.sleep(2)
        assert hook.get_job(sid)["status"] == "RUNNING"
        asyncio.run(MatrixRayJobTrigger(sid, "matrix_ray_default").on_kill())  # the default stops it
        assert _wait_status(hook, sid, {"STOPPED", "SUCCEEDED", "FAILED"}) == "STOPPED"
    finally:
        hook.stop(sid)


def test_two_deployments_sharing_a_cluster_never_meet(conn, tmp_path: Path, monkeypatch) -> None:
    """Defect: job ids carried no deployment, so staging's task re-attached to (or, as new work,
    stopped) prod's job of the same dag, task and run ids."""
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 5)
    hook, ids = MatrixRayHook(), {}
    try:
        for name in ("staging", "prod"):
            monkeypatch.setenv("AIRFLOW__MATRIX__DEPLOYMENT", name)
            ctx = task_context("shared_dag", "t", "manual__1", try_number=2)  # a retry: superseded jobs are stopped
            ids[name], attached = _op("t", src, tmp_path / name).submit_or_attach(hook, ctx)
            assert attached is None, f"{name} re-attached to {ids}"
            assert hook.get_job(ids[name])["metadata"]["airflow_deployment"] == name
        assert ids["staging"] != ids["prod"] and ids["prod"].startswith("matrix-prod-shared-dag-t-")
        assert hook.get_job(ids["staging"])["status"] in {"PENDING", "RUNNING", "SUCCEEDED"}, "prod stopped it"
    finally:
        for sid in ids.values():
            hook.stop(sid)


def test_execution_timeout_holds_through_an_outage_and_a_failed_stop(conn, proxied) -> None:
    """Defects: the outage branch skipped the deadline (a task past its execution_timeout waited out the
    whole outage budget), and a stop that failed crashed the trigger instead of sending TIMEOUT."""
    hook = MatrixRayHook("proxied")
    sid = _sleeping_job(hook, 60)
    _wait_status(hook, sid, {"RUNNING"})
    try:
        with proxied.outage():
            started = time.monotonic()
            trigger = MatrixRayJobTrigger(sid, "proxied", 1, deadline=time.time() + 2, outage_budget_s=600)
            event = _run_trigger(trigger)
        assert event["status"] == "TIMEOUT" and "stop it by hand" in event["message"], event
        assert time.monotonic() - started < 60, "the deadline, not the 600 s outage budget, ended the wait"
        # Dashboard back: the same deadline stops the job.
        event = _run_trigger(MatrixRayJobTrigger(sid, "proxied", poll_interval=1, deadline=time.time() - 1))
        assert event["status"] == "TIMEOUT" and "was stopped" in event["message"], event
        assert _wait_status(hook, sid, {"STOPPED", "SUCCEEDED", "FAILED"}) == "STOPPED"
    finally:
        hook.stop(sid)
    # A job that ended before the deadline was looked at is reported as it ended, not as a timeout.
    done = _sleeping_job(hook, 0)
    _wait_status(hook, done, {"SUCCEEDED"})
    event = _run_trigger(MatrixRayJobTrigger(done, "proxied", poll_interval=1, deadline=time.time() - 1))
    assert event["status"] == "SUCCEEDED", event


def _sleeping_job(hook: MatrixRayHook, seconds: float) -> str:
    """A Ray job that only waits: for tests of waiting, stopping and outages (no pipeline start-up)."""
    return hook.submit(f"python -c 'import time; time.sleep({seconds})'", f"sleep-{time.time_ns()}")


def _down_for(proxy: FaultProxy, seconds: float) -> None:
    time.sleep(1)
    with proxy.outage():
        time.sleep(seconds)


def test_logs_are_read_as_a_bounded_tail(conn, proxied) -> None:
    """Defect: every poll downloaded the whole log, so transfer grew quadratically over a long job."""
    hook = MatrixRayHook("proxied")
    lines = 40_000
    script = f"for i in range({lines}): print(f'{PROGRESS_PREFIX}rows_done={{i}} elapsed_s={{i}}')"
    sid = hook.submit(f"python -c {json.dumps(script)}", f"tail-{time.time_ns()}")
    _wait_status(hook, sid, {"SUCCEEDED"})
    tail = hook.tail_logs(sid, 100)
    got = tail.splitlines()
    assert len(got) == 100 and got[-1].endswith(f"elapsed_s={lines - 1}")
    assert len(tail) < 10_000, "one poll moves ~100 lines, not the ~2 MB log"
    assert all(path != f"/api/jobs/{sid}/logs" for _, path, _ in proxied.log), "never the whole log"
    assert new_progress(tail, got[-3]) == got[-2:]
    assert new_progress(tail, "scrolled out") == got


def test_connection_extras_from_a_uri_and_the_test_button(conn, monkeypatch) -> None:
    """Defect: `?tls=false` read as true (any non-empty string is), and there was no test_connection."""
    uri = f"matrix-ray://:{conn['password']}@{conn['host']}:{conn['port']}/?tls=false&verify_tls=false"
    monkeypatch.setenv("AIRFLOW_CONN_FROM_URI", uri)
    hook = MatrixRayHook("from_uri")
    endpoint = hook.endpoint()
    assert endpoint.base_url == f"http://{conn['host']}:{conn['port']}" and endpoint.verify is False
    ok, message = hook.test_connection()
    assert ok and "accepted the token" in message, message
    monkeypatch.setenv("AIRFLOW_CONN_BAD_TOKEN", uri.replace(conn["password"], "nope"))
    ok, message = MatrixRayHook("bad_token").test_connection()
    assert not ok and "refused the token of connection 'bad_token'" in message


def test_default_deferrable_follows_airflow_config(airflow_env) -> None:
    """Defect: deferrable was hard-coded True instead of `[operators] default_deferrable`."""
    code = (
        "from matrix_provider.operators import MatrixPipelineOperator as M; from matrix_provider.sensors import "
        "MatrixRayJobSensor as S; print(M(task_id='t', pipeline='p', input_uri='i', output_uri='o').deferrable, "
        "S(task_id='s', submission_id='x').deferrable)"
    )
    default = airflow_env.python(code).split()
    saved = airflow_env.env
    airflow_env.env = {**saved, "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "true"}
    try:
        configured = airflow_env.python(code).split()
    finally:
        airflow_env.env = saved
    assert default == ["False", "False"] and configured == ["True", "True"]


def test_assets_are_unique_per_dag_and_mapped_tasks_have_outlets() -> None:
    """Defect: `matrix://<task_id>` collided across DAGs, and mapped tasks had no outlets at all."""
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    uris = []
    for dag_id in ("team_a", "team_b"):
        with DAG(dag_id=dag_id, schedule=None) as dag:
            single = MatrixPipelineOperator(
                task_id="curate", pipeline="natural_reasoning", input_uri="i", output_uri="o"
            )
            mapped = MatrixPipelineOperator.partial(
                task_id="shards", pipeline="natural_reasoning", output_uri="o"
            ).expand(input_uri=["a", "b"])
        uris.append(single.outlets[0].uri)
        assert [a.uri for a in mapped.outlets] == [f"matrix://{dag_id}/shards"]
        serialized = DagSerialization.to_dict(dag)
        tasks = {t["__var"]["task_id"]: t["__var"] for t in serialized["dag"]["tasks"]}
        assert "matrix://" + dag_id + "/shards" in json.dumps(tasks["shards"]), "the scheduler must see the outlet"
    assert uris == ["matrix://team_a/curate", "matrix://team_b/curate"]
    # Fire and forget declares no default asset (it ends before any data exists); an alias is kept.
    with DAG(dag_id="ff", schedule=None):
        submit = MatrixPipelineOperator(
            task_id="s", pipeline="natural_reasoning", input_uri="i", output_uri="o", wait_for_completion=False
        )
        aliased = MatrixPipelineOperator.partial(
            task_id="m", pipeline="natural_reasoning", output_uri="o", output_alias="curated"
        ).expand(input_uri=["a"])
    assert submit.outlets == []
    assert [getattr(o, "name", None) for o in aliased.outlets] == ["matrix-ff-m", "curated"]


def test_matrix_view_renders_only_http_links() -> None:
    """A URL in XCom is data a task wrote: a `javascript:` link would run in Airflow's origin."""
    from matrix_provider.plugins.ui import _link

    assert _link("javascript:alert(document.cookie)", "Ray job") == ""
    assert _link("https://ray.example/#/jobs/x", "Ray job").startswith('<a href="https://ray.example/#/jobs/x"')


def test_matrix_view_sees_a_rotated_token_and_asks_a_dag_runs_own_cluster(ray_cluster, monkeypatch, tmp_path) -> None:
    """Defects: connections were cached for the API server's lifetime (a rotated token was used until a
    restart), and a job on a cluster its DAG run brought up was asked about through the default
    connection. Such a job is not asked about at all: the API server never reads a token file that
    XCom names (a task could name any file and any URL)."""
    from matrix_provider.plugins import ui

    host, port = ray_cluster.dashboard_url.removeprefix("http://").split(":")
    fields = {"conn_type": "matrix_ray", "host": host, "port": int(port)}
    monkeypatch.setenv("AIRFLOW_CONN_ROTATED", json.dumps({**fields, "password": "old-token"}))
    assert ui._connection("rotated").password == "old-token"
    monkeypatch.setenv("AIRFLOW_CONN_ROTATED", json.dumps({**fields, "password": ray_cluster.token}))
    assert ui._connection("rotated").password == "old-token", "cached within the minute"
    monkeypatch.setattr(ui, "_CONN_TTL_S", 0.0)
    assert ui._connection("rotated").password == ray_cluster.token

    hook = MatrixRayHook("rotated")
    sid = _sleeping_job(hook, 60)
    try:
        _wait_status(hook, sid, {"RUNNING"})
        values = {ui.CONN_ID_KEY: "no_such_connection", ui.CLUSTER_KEY: "per-run"}
        assert ui._live(sid, ui._source(values))["state"].startswith("unknown (on its DAG run's own cluster")
        assert ui._live(sid, "rotated")["state"] == "RUNNING"
    finally:
        hook.stop(sid)


def test_fire_and_forget_then_sensor_then_stop(conn, tmp_path: Path) -> None:
    """Users of such providers ask for submit-and-return, a sensor (deferrable too) and a stop operator."""
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 10)
    submitted = _op("ff", src, tmp_path / "out", wait_for_completion=False).execute(
        task_context("ff_dag", "ff", f"manual__{time.time()}")
    )
    sid = submitted["ray_submission_id"]
    sensor = MatrixRayJobSensor(
        task_id="wait", submission_id=sid, output_uri=str(tmp_path / "out"), deferrable=True, poke_interval=2
    )
    try:
        manifest = sensor.execute({})
    except TaskDeferred as deferred:
        event = _run_trigger(deferred.trigger)
        manifest = sensor.execute_complete({}, event)
    assert manifest["rows_in"] == 10
    # Poke mode on a finished job, and the stop operator on it (already ended: left as it is).
    assert MatrixRayJobSensor(task_id="poke", submission_id=sid, poke_interval=1).poke({}).xcom_value["rows_in"] == 10
    assert MatrixStopJobOperator(task_id="stop", submission_id=sid).execute({}) == "SUCCEEDED"
    # A running job: stopped, and a sensor on it fails with the status.
    running = _sleeping_job(MatrixRayHook(), 120)
    _wait_status(MatrixRayHook(), running, {"RUNNING"})
    assert MatrixStopJobOperator(task_id="stop", submission_id=running).execute({}) == "STOPPED"
    with pytest.raises(AirflowException, match=f"Ray job {running} STOPPED"):
        MatrixRayJobSensor(task_id="w", submission_id=running, deferrable=False).poke({})
    with pytest.raises(AirflowException, match="does not exist"):
        MatrixStopJobOperator(task_id="stop", submission_id="no-such-job").execute({})
    assert MatrixStopJobOperator(task_id="stop", submission_id="no-such-job", missing_ok=True).execute({}) == "MISSING"


def test_a_failed_submission_is_not_resent(conn, proxied) -> None:
    """A POST is not idempotent: a 500 on submit is reported once, never retried into duplicates."""
    proxied.rule(method="POST", path_regex=r"^/api/jobs/$", fail_first=1)
    with pytest.raises(RayJobsError, match=r"Ray refused job 'never-\d+' \(HTTP 500\)"):
        MatrixRayHook("proxied").submit("true", f"never-{time.time_ns()}")
    assert proxied.matched == 1, "the submission was sent once"


def test_hook_retries_5xx_then_names_the_outage(conn, proxied) -> None:
    """Defect: an HTTP 5xx raised out of the hook at once."""
    proxied.rule(method="GET", path_regex=r"^/api/version$", fail_first=2)
    hook = MatrixRayHook("proxied")
    assert hook.version()["ray_version"], "two 500s are retried through"
    assert proxied.failed == 2
    proxied.rearm(10**6)
    with pytest.raises(RayUnavailable, match=r"unavailable for \d+s \(HTTP 500"):
        MatrixRayHook("proxied").version()


def test_openlineage_reports_the_input_and_output_folders() -> None:
    """Users of such providers ask for lineage: input_uri -> output_uri as OpenLineage datasets."""
    from airflow.providers.openlineage.extractors.base import DefaultExtractor
    from airflow.providers.openlineage.extractors.manager import ExtractorManager

    op = MatrixPipelineOperator(
        task_id="t", pipeline="natural_reasoning", input_uri="s3://corpora/dclm/2026-01-01/", output_uri="/data/out/"
    )
    assert ExtractorManager().get_extractor_class(op) is DefaultExtractor, "OpenLineage finds the operator's facets"
    lineage = op.get_openlineage_facets_on_complete(None)
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("s3://corpora", "dclm/2026-01-01")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [("file", "/data/out")]


def test_sensor_and_stop_reach_a_cluster_of_the_dag_run_and_its_token_is_masked(ray_cluster, tmp_path: Path) -> None:
    """Defects: the sensor and the stop operator took no `cluster=` (only a connection), and a token
    read from a cluster's token file was never masked in task logs."""
    from airflow.sdk._shared.secrets_masker import redact

    token_file = tmp_path / "token"
    token_file.write_text(ray_cluster.token + "\n")
    cluster = {"name": "per-run", "dashboard_url": ray_cluster.dashboard_url, "token_file": str(token_file)}
    hook = MatrixRayHook(cluster=cluster)  # no connection in this process's environment at all
    assert ray_cluster.token not in repr(hook.endpoint()) and redact(ray_cluster.token) == "***"
    sid = _sleeping_job(hook, 60)
    _wait_status(hook, sid, {"RUNNING"})
    assert MatrixRayJobSensor(task_id="s", submission_id=sid, cluster=cluster).poke({}) is False
    assert MatrixStopJobOperator(task_id="stop", submission_id=sid, cluster=cluster).execute({}) == "STOPPED"


def test_the_slurm_cluster_operator_survives_a_dag_copy() -> None:
    """Defect: a threading.Event made in __init__ made `dag.partial_subset()` (a clear with
    downstream) raise on any DAG holding MatrixSlurmClusterOperator."""
    from airflow.sdk import DAG

    from matrix_provider.operators.slurm_cluster import MatrixSlurmClusterOperator, MatrixSlurmClusterTeardownOperator

    with DAG("slurm_copy", schedule=None) as dag:
        up = MatrixSlurmClusterOperator(task_id="up", nodes=2)
        MatrixSlurmClusterTeardownOperator(task_id="down", cluster=up.output)
    subset = dag.partial_subset("up", include_downstream=True)
    assert set(subset.task_ids) == {"up", "down"}
