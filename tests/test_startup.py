"""Start-up in two waves: the first row's path starts alone, the rest joins when it answers, and rows
bound for an agent that has not started yet wait for it instead of failing."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import ray

from matrix_provider import names
from matrix_provider.runtime.actors import RunActors, first_roles
from matrix_provider.runtime.agents import PeerDirectory, PeerMissing, hand_off
from matrix_provider.runtime.chains import Chain
from matrix_provider.runtime.orchestrator import Orchestrator
from matrix_provider.runtime.pipeline import load_pipeline
from matrix_provider.runtime.spec import compose
from tests.conftest import REPO, run_matrix
from tests.corpus import write_jsonl


def _spec(name: str, partitions: int = 1):
    return compose(name, [], {"input": "-", "output": "-", "partitions": partitions})


@pytest.mark.parametrize(
    ("pipeline", "expected"),
    [
        ("natural_reasoning", {"filter"}),
        ("tau2", {"user"}),
        ("prefilter", set()),
        # coral's route reads the row's gold answer: a blank row tells nothing, so every role is first
        ("coral", {"agent_a", "agent_b", "extract", "match"}),
    ],
)
def test_the_first_wave_holds_the_roles_a_row_goes_to_first(pipeline: str, expected: set[str]) -> None:
    spec = _spec(pipeline)
    assert first_roles(load_pipeline(spec.pipeline), spec) == expected


@ray.remote(num_cpus=0)
class _Inbox:
    def __init__(self) -> None:
        self.got: list[str] = []

    async def enqueue_many(self, items: list[bytes | Orchestrator]) -> None:
        self.got.extend(Orchestrator.unwire(m).id for m in items)

    async def ids(self) -> list[str]:
        return self.got


def test_a_row_for_an_agent_not_started_yet_waits_for_it(ray_client) -> None:
    run_id = uuid.uuid4().hex[:8]
    peers = PeerDirectory(run_id, [Chain(("late",), 2, 0.0, 0.0, ())])
    with pytest.raises(PeerMissing, match="no replica of 'late' has started yet"):
        peers.agent("late")

    def start(i: int):
        return _Inbox.options(name=names.agent_name(run_id, "late", i), namespace=names.NAMESPACE).remote()

    async def deliver_while_it_starts():
        msg = Orchestrator(id="row-1", partition=0, delivery=1, deadline=time.time() + 60, row={})
        sending = asyncio.ensure_future(hand_off(peers, "late", msg))
        await asyncio.sleep(0.5)
        assert not sending.done()  # held, retrying, not failed
        first = start(0)
        await asyncio.wait_for(sending, 30)
        return first

    first = asyncio.run(deliver_while_it_starts())
    assert ray.get(first.ids.remote()) == ["row-1"]
    with pytest.raises(PeerMissing, match="not every replica"):  # an audit now would be inconclusive
        peers.all_agents()
    second = start(1)
    time.sleep(0.3)
    assert len(peers.all_agents()) == 2
    for actor in (first, second):
        ray.kill(actor)


def test_run_actors_start_the_first_rows_path_then_the_rest(ray_client) -> None:
    spec = _spec("natural_reasoning", partitions=3)
    run_id = uuid.uuid4().hex[:8]
    actors = RunActors(spec, load_pipeline(spec.pipeline), run_id, 1, 1, None)
    try:
        actors.start()
        assert len(actors.drivers) == 1
        assert set(actors.agents) == {names.agent_name(run_id, "filter", 0)}  # the first row's chain
        assert not actors.poll()  # nothing answered yet: the second wave waits
        assert len(actors.drivers) == 1
        ray.get(actors.waiting(), timeout=60)
        assert actors.poll()
        assert actors.waiting() == [] and not actors.poll()
        assert len(actors.drivers) == 3
        # filter has two replicas, score and question one each: they share a chain of one actor
        expected = {names.agent_name(run_id, "filter", i) for i in (0, 1)} | {
            names.agent_name(run_id, "score+question", 0)
        }
        assert set(actors.agents) == expected
    finally:
        actors.kill()


def test_a_pipeline_without_agents_starts_every_driver_at_once(ray_client) -> None:
    """prefilter's drivers do all its work: holding one back would leave its core idle."""
    spec = _spec("prefilter", partitions=2)
    actors = RunActors(spec, load_pipeline(spec.pipeline), uuid.uuid4().hex[:8], 1, 1, None)
    try:
        actors.start()
        assert len(actors.drivers) == 2 and not actors.agents
    finally:
        actors.kill()


def test_an_agent_that_cannot_start_fails_the_run_with_its_cause(ray_cluster, tmp_path) -> None:
    """Ray does not restart an actor whose constructor raised: rows for it would only wait and retry."""
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 20)
    spec = str(REPO / "tests" / "pipelines" / "broken_role.yaml")
    started = time.monotonic()
    result = run_matrix(
        ["run", spec, "--input", str(src), "--output", str(tmp_path / "out"), "--quiet"],
        {**ray_cluster.env, "PYTHONPATH": str(REPO)},
        timeout=180,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    # first and broken share a chain (one actor): its constructor raised in `broken`
    assert "agent first+broken-0 could not start" in result.stderr, result.stderr[-2000:]
    assert "model file /models/missing.gguf does not exist" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - started < 60
