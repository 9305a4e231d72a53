"""The run's agents and partition drivers, started in two waves.

Ray starts the worker processes of every pending actor at once. On a node with few cores they
share the CPU (each imports Ray and the runtime) and all become ready together, late: on 2 cores,
four processes take ~2.5 s where two take ~1.4 s. The first row only needs partition 0's driver
and a replica of the chain (`runtime/chains.py`) hosting the role it goes to first, so those
start alone (a pipeline without agents, whose drivers do all the work, starts every driver at
once); every other actor starts when they answer (or after `_FIRST_WAVE_S`, should one of them
never be placed). Rows bound for an agent of the second wave wait in `hand_off`, which retries
until the name resolves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from matrix_provider import names
from matrix_provider.runtime.agents import Agent
from matrix_provider.runtime.chains import Chain, plan_chains
from matrix_provider.runtime.driver import PartitionDriver
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.spec import PipelineSpec

_BIG = 100_000  # async actors: concurrency is bounded by credits and worker counts, not by Ray
_FIRST_WAVE_S = 10.0  # start the second wave after this long even if the first has not answered


def first_roles(pipeline: Pipeline, spec: PipelineSpec) -> set[str]:
    """The roles a row can go to first: the pipeline's route of a blank row, else every role."""
    try:
        msg = pipeline.orchestrator(id="", partition=0, delivery=1, deadline=0.0, row={}, key="")
        role = msg.route(None)
    except Exception:  # a route that reads the row: any role may come first
        return set(spec.roles)
    return {role} if role in spec.roles else set(spec.roles)


class ActorInitFailed(RuntimeError):
    """An agent's or driver's constructor raised: the run cannot go on without it."""


class RunActors:
    """Creates the run's actors (first wave at once, the rest on `poll`) and kills them all at the end.

    `agents` (by name) and `drivers` (by partition) grow in place as the second wave starts.
    """

    def __init__(
        self, spec: PipelineSpec, pipeline: Pipeline, run_id: str, generation: int, epoch: int, client_config: Any
    ):
        self.spec = spec
        self.run_id = run_id
        self.generation = generation
        self.epoch = epoch
        self.client_config = client_config
        self.spec_json = spec.model_dump_json()
        self.agents: dict[str, Any] = {}
        self.drivers: list[Any] = []
        self.chains = plan_chains(spec, pipeline)
        starts = first_roles(pipeline, spec)
        first = [c for c in self.chains if starts & set(c.roles)]
        # Without agents the drivers do all the work (prefilter): every one of them is first.
        first_drivers = spec.run.partitions if not spec.roles else 1
        self._first: list[Callable[[], tuple[str, Any]]] = [
            *(lambda p=p: self._driver(p) for p in range(first_drivers)),
            *(lambda c=c: self._agent(c, 0) for c in first),
        ]
        self._rest: list[Callable[[], tuple[str, Any]]] = [
            *(lambda c=c: self._agent(c, 0) for c in self.chains if c not in first),
            *(lambda p=p: self._driver(p) for p in range(first_drivers, spec.run.partitions)),
            *(lambda c=c, i=i: self._agent(c, i) for c in self.chains for i in range(1, c.replicas)),
        ]
        self._pending: dict[Any, str] = {}  # readiness calls not answered yet -> the actor's name
        self._first_pending: set[Any] = set()
        self._deadline = 0.0

    def start(self) -> None:
        """The first wave; `poll` starts the rest once it answered."""
        self._first_pending = set(self._create(self._first))
        self._deadline = time.monotonic() + _FIRST_WAVE_S

    def waiting(self) -> list[Any]:
        """The first wave's unanswered readiness calls, while the second wave waits for them."""
        return list(self._first_pending) if self._rest else []

    def poll(self) -> bool:
        """Take the readiness answers, then start the second wave once the first answered or its
        time is up; True when this call started it. Raises ActorInitFailed for an actor whose
        constructor failed: Ray does not restart it, so rows bound for it would only wait."""
        if self._pending:
            ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
            for ref in ready:
                name = self._pending.pop(ref)
                self._first_pending.discard(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    if exc.actor_init_failed:
                        last = str(exc).strip().splitlines()[-1][:300]
                        raise ActorInitFailed(f"{name} could not start: {last}") from None
                except ray.exceptions.RayError:  # died after starting: Ray restarts it, the job's pings see it
                    continue
        if self._rest and (not self._first_pending or time.monotonic() >= self._deadline):
            self._create(self._rest)
            self._rest = []
            return True
        return False

    def _create(self, wave: list[Callable[[], tuple[str, Any]]]) -> list[Any]:
        refs = []
        for create in wave:
            name, ref = create()
            self._pending[ref] = name
            refs.append(ref)
        return refs

    def kill(self) -> None:
        for actor in [*self.drivers, *self.agents.values()]:
            ray.kill(actor, no_restart=True)

    def _agent(self, chain: Chain, i: int) -> tuple[str, Any]:
        name = names.agent_name(self.run_id, chain.name, i)
        agent = Agent.options(
            name=name,
            namespace=names.NAMESPACE,
            num_cpus=chain.num_cpus,
            num_gpus=chain.num_gpus,
            resources=dict(chain.resources) or None,
            max_concurrency=_BIG,
            scheduling_strategy="SPREAD",
        ).remote(self.run_id, chain.roles, self.spec_json, self.client_config)
        self.agents[name] = agent
        return f"agent {chain.name}-{i}", agent.incarnation.remote()

    def _driver(self, partition: int) -> tuple[str, Any]:
        driver = PartitionDriver.options(
            name=names.driver_name(self.run_id, partition),
            namespace=names.NAMESPACE,
            num_cpus=self.spec.resources.driver_num_cpus,
            max_concurrency=_BIG,
            scheduling_strategy="SPREAD",
        ).remote(self.run_id, partition, self.spec_json, self.generation, self.epoch)
        self.drivers.append(driver)
        return f"partition driver {partition}", driver.stats.remote()
