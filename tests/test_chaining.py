"""Role chaining (runtime/chains.py): which roles share an actor process, and that rows, audits and
per-role metrics hold across chained roles as across actors."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import ray

from matrix_provider import names
from matrix_provider.runtime.agents import Agent
from matrix_provider.runtime.chains import plan_chains
from matrix_provider.runtime.pipeline import load_pipeline
from matrix_provider.runtime.spec import compose
from tests.conftest import REPO, assert_exactly_once, read_output, run_matrix
from tests.corpus import write_jsonl

CHAINED = str(REPO / "tests" / "pipelines" / "chained.yaml")


def _plan(spec_name: str, *overrides: str) -> list[tuple[str, int]]:
    spec = compose(spec_name, list(overrides), {"input": "-", "output": "-"})
    return [(c.name, c.replicas) for c in plan_chains(spec, load_pipeline(spec.pipeline))]


def test_consecutive_roles_of_equal_resources_share_a_chain() -> None:
    # filter has 2 replicas, score and question 1 each: a pool of one size cannot be two
    assert _plan("natural_reasoning") == [("filter", 2), ("score+question", 1)]
    assert _plan("natural_reasoning", "roles.filter.replicas=1") == [("filter+score+question", 1)]
    assert _plan("coral") == [("agent_a+agent_b+extract+match", 1)]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("roles.score.num_gpus=1", ["filter", "score", "question"]),
        ("roles.score.resources={tpu: 1}", ["filter", "score", "question"]),
        ("roles.score.chain=false", ["filter", "score", "question"]),
        ("roles.question.num_cpus=1", ["filter+score", "question"]),
        ("roles.question.replicas=3", ["filter+score", "question"]),
    ],
)
def test_a_chain_is_cut_where_a_role_needs_its_own_resources(override: str, expected: list[str]) -> None:
    plan = _plan("natural_reasoning", "roles.filter.replicas=1", override)
    assert [name for name, _ in plan] == expected


def test_a_role_with_a_sandbox_session_runs_alone() -> None:
    assert _plan("tau2") == [("user+assistant", 1), ("tools", 1), ("reward", 1)]


def _run_chained(cluster, tmp_path: Path, out: str, *overrides: str) -> list[dict[str, object]]:
    src = tmp_path / "in" / "d.jsonl"
    if not src.exists():
        write_jsonl(src, 60)
    args = ["run", CHAINED, "--input", str(src), "--output", str(tmp_path / out), "--quiet", *overrides]
    result = run_matrix(args, {**cluster.env, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = read_output(str(tmp_path / out))
    assert_exactly_once(rows, 60)
    return rows


def test_chained_roles_hand_over_the_message_object_itself(ray_cluster, tmp_path: Path) -> None:
    """Chained, the next role gets the very object (no Ray call, no pickle); cut, a copy elsewhere."""
    chained = _run_chained(ray_cluster, tmp_path, "chained")
    assert {(r["status"], r["same_process"], r["same_object"]) for r in chained} == {("ok", True, True)}
    cut = _run_chained(ray_cluster, tmp_path, "cut", "roles.second.chain=false")
    assert {(r["status"], r["same_process"], r["same_object"]) for r in cut} == {("ok", False, False)}


@ray.remote(num_cpus=0)
class _Driver:
    """Stands in for partition 0's driver: keeps every report."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, int]] = []

    async def reports(self, items: list[tuple[str, str, int, object]]) -> None:
        self.got.extend((kind, key, delivery) for kind, key, delivery, _ in items)

    async def seen(self) -> list[tuple[str, str, int]]:
        return self.got


def _processed(port: int) -> dict[str, float]:
    """matrix_role_processed_total of the `chained` pipeline by role, from the node's metrics agent."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_matrix_role_processed_total{") and 'pipeline="chained"' in line:
            role = re.search(r'role="([^"]+)"', line)
            assert role is not None
            totals[role[1]] = totals.get(role[1], 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_rows_in_a_chained_role_are_held_for_the_audit_and_counted_per_role(ray_client) -> None:
    """A row waiting in the chain's second role is still in `held_rows` (an audit finds it), every
    row is reported once, and Ray's metrics count each role's steps apart."""
    spec = compose(CHAINED, ["params.hold_s=3"], {"input": "-", "output": "-"})
    run_id = uuid.uuid4().hex[:8]
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    before = _processed(port)
    env = {"env_vars": {"PYTHONPATH": str(REPO)}}
    driver = _Driver.options(name=names.driver_name(run_id, 0), namespace=names.NAMESPACE).remote()
    agent = Agent.options(
        name=names.agent_name(run_id, "first+second", 0), namespace=names.NAMESPACE, runtime_env=env
    ).remote(run_id, ("first", "second"), spec.model_dump_json(), None)
    try:
        ray.get(agent.incarnation.remote(), timeout=120)
        msgs = []
        for i in range(20):
            msg = load_pipeline(spec.pipeline).orchestrator(
                id=f"r{i}", partition=0, delivery=1, deadline=time.time() + 120, row={}, key=f"u/{i}"
            )
            msg.next_role = "first"
            msg.offload(spec.orchestrator.offload_bytes)
            msgs.append(msg.wire())
        ray.get(agent.enqueue_many.remote(msgs))
        time.sleep(1.0)  # `first` is done with all of them; `second` holds them for 3 s
        held = ray.get(agent.held_rows.remote(0))
        assert sorted(held) == sorted((f"u/{i}", 1) for i in range(20))
        deadline = time.monotonic() + 60
        while len(ray.get(driver.seen.remote())) < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sorted(ray.get(driver.seen.remote())) == sorted(("done", f"u/{i}", 1) for i in range(20))
        assert ray.get(agent.held_rows.remote(0)) == []
        want = {role: before.get(role, 0.0) + 20 for role in ("first", "second")}
        deadline = time.monotonic() + 60
        while (got := _processed(port)) != want and time.monotonic() < deadline:
            time.sleep(1.0)
        assert got == want
    finally:
        for actor in (agent, driver):
            ray.kill(actor)
