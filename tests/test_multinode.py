"""A real multi-node Ray cluster on this machine: a head and two worker nodes (`ray start --address`),
each with its own raylet and object store, output on a real S3 (SeaweedFS).

A worker node is lost mid-run (its raylet SIGKILLed, as when a machine dies): its agents and any
driver on it die with it, Ray restarts them elsewhere, the lost rows are delivered again and the
lost units redone, and every row still comes out exactly once.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import fsspec
import pytest
from ray.util.state import list_actors, list_workers

from tests.conftest import (
    VENV_BIN,
    assert_exactly_once,
    committed_units,
    free_port,
    read_manifest,
    read_output,
    run_matrix,
)
from tests.corpus import write_jsonl
from tests.multinode import kill_worker_raylet, multinode_cluster, wait_node_dead

SLOW_SIM = [
    "llm=sim",
    "llm.decode_s_per_token=0.03",
    "llm.output_tokens_mean=10",
    "llm.slots=32",
    "io.part_rows=20",
    "io.flush_interval_s=1",
    "orchestrator.audit_interval_s=0.5",
    "roles.filter.replicas=3",
    "roles.score.replicas=3",
    "roles.question.replicas=2",
]


def _node_of(actors: list, name_part: str) -> set[str]:
    return {a.node_id for a in actors if name_part in (a.name or "") or name_part == a.class_name}


@pytest.mark.timeout(900)
def test_losing_a_node_mid_run_loses_and_doubles_nothing(s3_server, tmp_path: Path) -> None:
    fs = fsspec.filesystem("s3", **s3_server.storage_options())
    src = tmp_path / "in"
    for i in range(6):
        write_jsonl(src / f"docs-{i}.jsonl", 50, start=50 * i)
    s3_in = f"s3://{s3_server.bucket}/mn-in-{tmp_path.name}"
    fs.put(str(src), s3_in, recursive=True)
    out = f"s3://{s3_server.bucket}/mn-out-{tmp_path.name}"
    serve = {"MATRIX_SERVE_PORT": str(free_port())}  # Serve's HTTP port: never a default another cluster holds
    with multinode_cluster(tmp_path, workers=2, num_cpus=2, extra_env={**s3_server.env, **serve}) as cluster:
        # A local output would be split over the nodes' disks: refused before any work.
        refused = run_matrix(
            ["run", "prefilter", "--input", s3_in, "--output", str(tmp_path / "local")], cluster.env, timeout=300
        )
        assert refused.returncode == 2 and "s3://" in refused.stderr, refused.stderr

        args = ["natural_reasoning", "--input", s3_in, "--output", out, "--partitions", "3", "--concurrency", "30"]
        proc = subprocess.Popen(
            [str(VENV_BIN / "matrix"), "run", *args, *SLOW_SIM, "--quiet"],
            env=cluster.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 240
            while not committed_units(out, s3_server.storage_options()):
                assert proc.poll() is None and time.monotonic() < deadline, "no unit committed"
                time.sleep(0.3)
            actors = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
            agent_nodes = _node_of(actors, "-agent-")
            assert len(agent_nodes) > 1, f"agents all on one node: {agent_nodes}"
            # Lose a worker node that hosts pipeline actors (agents, partition drivers or both) but
            # neither the job's own process nor the simulator. Every node registers as 127.0.0.1, so
            # the job's process is found by its pid (the state API also lists dead drivers, e.g. the
            # refused run's); the simulator's node affinity is soft, so it may sit on any node.
            job = list_workers(address=cluster.dashboard_url, filters=[("pid", "=", str(proc.pid))], detail=True)
            keep = {w.node_id for w in job} | _node_of(actors, "SimReplica")
            pipeline_nodes = agent_nodes | _node_of(actors, "-driver-")
            victims = [i for i, node in enumerate(cluster.workers) if node.node_id in pipeline_nodes - keep]
            placement = {a.name or a.class_name: a.node_id[:8] for a in actors}
            assert len(job) == 1 and victims, f"no worker node hosts only pipeline actors: {job} {placement}"
            node_id = kill_worker_raylet(cluster, victims[0])
            wait_node_dead(cluster, node_id)
            output, _ = proc.communicate(timeout=600)
        finally:
            proc.kill()
        assert proc.returncode == 0, output[-3000:]
    rows = read_output(out, s3_server.storage_options())
    assert_exactly_once(rows, 300)
    assert not [r for r in rows if r["status"] == "error"], [r["error"] for r in rows if r["status"] == "error"][:3]
    manifest = read_manifest(out, s3_server.storage_options())
    assert manifest["rows_in"] == manifest["rows_out"] == 300
    assert fs.exists(f"{out}/_SUCCESS")
    fs.invalidate_cache()
    parts = {p.rsplit("/", 1)[1] for p in fs.glob(f"{out}/part-*.parquet")}
    named = {part["name"] for unit in committed_units(out, s3_server.storage_options()) for part in unit["parts"]}
    assert parts == named  # parts of the lost attempts were removed
