"""No secret on any surface a user of the cluster or of Airflow can read.

Two runs write to the session's S3: one from a laptop-style driver (`matrix run` with RAY_ADDRESS and
the keys in its own environment), one submitted by MatrixPipelineOperator through the Jobs API. Then
every Ray Jobs and State API listing, the jobs' logs, the operator's XCom and return value and what it
logged are searched for the S3 secret key and the Ray token. Before the fix the laptop run forwarded
AWS_SECRET_ACCESS_KEY into its job's runtime_env, which the State API shows on every actor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from matrix_provider.operators import MatrixPipelineOperator
from tests.conftest import S3_CREDS, read_manifest, run_matrix, task_context
from tests.corpus import write_jsonl

SIM = {"llm": "sim", "llm.decode_s_per_token": 0.002, "llm.output_tokens_mean": 8}
# What the State API lists in detail (every row it keeps, dead actors and finished tasks included).
STATE_LISTS = ("actors", "tasks", "workers", "placement_groups", "nodes", "jobs", "objects", "runtime_envs")


def _ray_surfaces(dashboard: str, token: str, submission_ids: list[str]) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=dashboard, headers=headers, timeout=60) as client:
        seen = {"/api/jobs/": client.get("/api/jobs/").text}
        for sid in submission_ids:
            seen[f"/api/jobs/{sid}"] = client.get(f"/api/jobs/{sid}").text
            seen[f"/api/jobs/{sid}/logs"] = client.get(f"/api/jobs/{sid}/logs").text
        for name in STATE_LISTS:
            answer = client.get(f"/api/v0/{name}", params={"detail": "true", "limit": 10000})
            assert answer.status_code == 200, (name, answer.text[:500])
            seen[f"/api/v0/{name}"] = answer.text
        seen["/api/serve/applications/"] = client.get("/api/serve/applications/").text
    return seen


def test_no_secret_reaches_ray_or_airflow(
    ray_cluster, s3_server, conn, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd
) -> None:
    secret, token = S3_CREDS["AWS_SECRET_ACCESS_KEY"], ray_cluster.token
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 12)
    overrides = [f"{k}={v}" for k, v in SIM.items()]
    out = f"s3://{s3_server.bucket}/leak/laptop"
    laptop = run_matrix(
        ["run", "natural_reasoning", "--input", str(src), "--output", out, *overrides],
        {**ray_cluster.env, **s3_server.env},
        timeout=300,
    )
    assert laptop.returncode == 0, laptop.stderr[-3000:]

    ctx = task_context("leak_dag", "curate", "manual__1")
    nodes_env = {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}  # no key
    op = MatrixPipelineOperator(
        task_id="curate",
        pipeline="natural_reasoning",
        input_uri=str(src),
        output_uri=f"s3://{s3_server.bucket}/leak/airflow",
        overrides=SIM,
        runtime_env={"env_vars": nodes_env},
        deferrable=False,
        poll_interval=1,
    )
    with caplog.at_level(logging.DEBUG):
        manifest = op.execute(ctx)
    assert manifest["rows_in"] == 12
    assert read_manifest(f"s3://{s3_server.bucket}/leak/airflow", s3_server.storage_options())["rows_in"] == 12

    surfaces = _ray_surfaces(ray_cluster.dashboard_url, token, [manifest["ray_submission_id"]])
    surfaces["matrix run output"] = laptop.stdout + laptop.stderr
    surfaces["operator return value"] = json.dumps(manifest, default=str)
    surfaces["XCom"] = json.dumps(ctx["ti"].pushed, default=str)
    captured = capfd.readouterr()
    surfaces["task log"] = caplog.text + captured.out + captured.err
    assert "natural_reasoning" in surfaces[f"/api/jobs/{manifest['ray_submission_id']}"]
    assert "AWS_ENDPOINT_URL" in surfaces["/api/v0/actors"], "runtime_env is shown: the search would see a key"
    wanted = (("S3 secret", secret), ("Ray token", token))
    leaks = {where: [name for name, value in wanted if value in text] for where, text in surfaces.items()}
    assert not {where: names for where, names in leaks.items() if names}, leaks
