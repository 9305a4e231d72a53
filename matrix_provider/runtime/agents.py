"""Agents: stateless role replicas as async Ray actors, handing messages straight to each other.

An agent hosts one chain of roles (`runtime/chains.py`: consecutive roles of equal resources share
a process; most often a chain is one role). It takes a message from a role's queue, runs the role
(with a per-step timeout and retries with backoff), asks the orchestrator who acts next and puts
the message on that role's queue when this agent hosts it too (a function call: no Ray call, no
pickle, no offload), else enqueues it directly on a replica of the chain that hosts the role; a
finished row goes to its partition driver. Messages for the same actor or driver that meet within
a few milliseconds share one Ray call (`outbox.Outbox`).

Flow control cannot deadlock, whatever the routing graph (loops included): enqueueing never waits.
Drivers bound rows in flight by credits (one per admitted row), and a row is one message, so every
queue together holds at most the rows in flight. An agent drops a delivery whose deadline passed or
that a newer delivery of the same row superseded, and ends a row that loops past
`orchestrator.max_hops` as an error. A row it cannot carry on (its offloaded payload is gone, no
replica of the next role answers) is reported to its driver, which delivers it again at once.
The agent keeps every message it holds in `held`, for the audit its driver runs after an agent
died: from the moment it accepts a message until the message left it (accepted by another actor,
reported, or dropped), through every chained role in between.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from matrix_provider import names
from matrix_provider.llm.client import ClientConfig, LLMClient, LLMError
from matrix_provider.runtime.chains import Chain, plan_chains
from matrix_provider.runtime.metrics import RoleMetrics
from matrix_provider.runtime.orchestrator import ERROR, Orchestrator
from matrix_provider.runtime.outbox import Outbox
from matrix_provider.runtime.pipeline import load_pipeline, output_row
from matrix_provider.runtime.roles import Role, RowError
from matrix_provider.runtime.spec import PipelineSpec, RoleSpec
from matrix_provider.sandbox.client import SandboxClient

_HANDOFF_TRIES = 30
_LOOKUP_S = 0.2  # while some replicas of a chain have not started, look their names up this often
_REPORT_TRIES = 10
logger = logging.getLogger(__name__)
# To a driver: ("done", key, delivery, output row) or ("lost", key, delivery, reason).
Report = tuple[str, str, int, Any]


class PeerMissing(LookupError):
    """A peer's name does not resolve yet: its actor starts in the run's second wave."""


class PeerDirectory:
    """Lazily resolved handles of the other actors of a run (names survive actor restarts)."""

    def __init__(self, run_id: str, chains: Sequence[Chain], linger_s: float = 0.005):
        self.run_id = run_id
        self.linger_s = linger_s
        self.replicas = {chain.name: chain.replicas for chain in chains}
        self.chain_of = {role: chain.name for chain in chains for role in chain.roles}
        self._agents: dict[str, list[Any]] = {}
        self._looked_up: dict[str, float] = {}
        self._drivers: dict[int, Any] = {}
        self._turn = {name: itertools.count() for name in self.replicas}
        self._to_chain: dict[str, Outbox[Orchestrator]] = {}
        self._to_driver: dict[int, Outbox[Report]] = {}

    @classmethod
    def of(cls, run_id: str, spec: PipelineSpec) -> PeerDirectory:
        """The directory of a run of `spec`, chained as its actors are."""
        return cls(run_id, plan_chains(spec, load_pipeline(spec.pipeline)), spec.orchestrator.linger_s)

    def agent(self, chain: str) -> Any:
        """The next replica of `chain` in turn, among those started."""
        handles = self._agents.get(chain, [])
        if len(handles) < self.replicas[chain] and time.monotonic() - self._looked_up.get(chain, 0.0) > _LOOKUP_S:
            handles = self._agents[chain] = self._resolve(chain)
        if not handles:
            raise PeerMissing(f"no replica of {chain!r} has started yet")
        return handles[next(self._turn[chain]) % len(handles)]

    def all_agents(self) -> list[Any]:
        """Every agent of the run; PeerMissing while some have not started."""
        for chain in self.replicas:
            if len(self._agents.get(chain, [])) < self.replicas[chain]:
                self._agents[chain] = self._resolve(chain)
                if len(self._agents[chain]) < self.replicas[chain]:
                    raise PeerMissing(f"not every replica of {chain!r} has started yet")
        return [h for handles in self._agents.values() for h in handles]

    def _resolve(self, chain: str) -> list[Any]:
        self._looked_up[chain] = time.monotonic()
        found = []
        for i in range(self.replicas[chain]):
            try:
                found.append(ray.get_actor(names.agent_name(self.run_id, chain, i), namespace=names.NAMESPACE))
            except ValueError:  # not created yet
                continue
        return found

    def driver(self, partition: int) -> Any:
        if partition not in self._drivers:
            self._drivers[partition] = ray.get_actor(
                names.driver_name(self.run_id, partition), namespace=names.NAMESPACE
            )
        return self._drivers[partition]

    def to_role(self, role: str) -> Outbox[Orchestrator]:
        """Batched `enqueue_many` calls to the chain hosting `role`; each batch goes to its next replica."""
        chain = self.chain_of[role]
        if chain not in self._to_chain:
            self._to_chain[chain] = Outbox(
                lambda msgs: self.agent(chain).enqueue_many.remote([m.wire() for m in msgs]), linger_s=self.linger_s
            )
        return self._to_chain[chain]

    def to_driver(self, partition: int) -> Outbox[Report]:
        """Batched `reports` calls to the driver of `partition`."""
        if partition not in self._to_driver:
            self._to_driver[partition] = Outbox(
                lambda items: self.driver(partition).reports.remote(items), linger_s=self.linger_s
            )
        return self._to_driver[partition]


async def hand_off(peers: PeerDirectory, role: str, msg: Orchestrator) -> None:
    """Enqueue on a replica of `role`, moving to the next replica while one is dead or restarting."""
    for attempt in range(_HANDOFF_TRIES):
        try:
            await peers.to_role(role).put(msg)
            return
        except (RayActorError, PeerMissing):
            await asyncio.sleep(min(0.1 * (attempt + 1), 2.0))
    raise RuntimeError(f"no replica of role {role!r} accepted row {msg.id}")


@dataclass
class Station:
    """One role of an agent's chain: its queue, its workers' count of steps under way, its metrics."""

    name: str
    spec: RoleSpec
    role: Role
    metrics: RoleMetrics
    queue: asyncio.Queue[Orchestrator] = field(default_factory=asyncio.Queue)
    running: int = 0


@ray.remote(max_restarts=-1, max_task_retries=0)
class Agent:
    def __init__(self, run_id: str, roles: tuple[str, ...], spec_json: str, client_config: ClientConfig | None):
        self.spec = PipelineSpec.model_validate_json(spec_json)
        self.pipeline = load_pipeline(self.spec.pipeline)
        self.chain = "+".join(roles)
        classes = {role: self.pipeline.roles[role] for role in roles}
        uses_llm = any(cls.uses_llm for cls in classes.values())
        self.llm = LLMClient(client_config) if uses_llm and client_config else None
        self.sandbox = SandboxClient.named(run_id, self.spec.sandbox.pools) if self.pipeline.uses_sandbox else None
        self.stations: dict[str, Station] = {}
        for role, cls in classes.items():
            role_spec = self.spec.roles[role]
            llm = self.llm if cls.uses_llm else None
            instance = cls(role, role_spec, self.spec.params, llm, self.sandbox)
            self.stations[role] = Station(role, role_spec, instance, RoleMetrics(self.pipeline.name, role))
        self.peers = PeerDirectory.of(run_id, self.spec)
        self.incarnation_id = uuid.uuid4().hex  # new after every restart: the run's supervisor watches it
        self.held: dict[tuple[str, int], int] = {}
        self.newest: dict[str, int] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.step_retries = 0
        self.dropped = 0

    def _start(self) -> None:
        if not self.tasks:
            loop = asyncio.get_running_loop()
            workers = [self._worker(s) for s in self.stations.values() for _ in range(s.spec.max_concurrency)]
            self.tasks = [loop.create_task(c) for c in (*workers, self._report_load())]  # held: never collected

    async def _report_load(self) -> None:
        """Each role's metrics, every second (`RoleMetrics.flush`)."""
        while True:
            for station in self.stations.values():
                station.metrics.flush(station.queue.qsize(), station.running)
            await asyncio.sleep(1.0)

    async def incarnation(self) -> str:
        """Also the run's readiness call: the workers start here, before the first row comes."""
        self._start()
        return self.incarnation_id

    async def enqueue_many(self, items: list[bytes | Orchestrator]) -> None:
        """Accept messages (`Orchestrator.wire()` forms); never waits (drivers' credits bound what is in flight)."""
        self._start()
        for item in items:
            msg = Orchestrator.unwire(item)
            self.held[(msg.key, msg.delivery)] = msg.partition
            self.newest[msg.key] = max(self.newest.get(msg.key, 0), msg.delivery)
            self.stations[msg.next_role].queue.put_nowait(msg)  # type: ignore[index]

    async def held_rows(self, partition: int) -> list[tuple[str, int]]:
        """[(row key, delivery)] of `partition` held here, for its driver's loss audit."""
        return [key for key, p in self.held.items() if p == partition]

    async def stats(self) -> dict[str, Any]:
        llm = self.llm.stats if self.llm else None
        return {
            "chain": self.chain,
            "queued": sum(s.queue.qsize() for s in self.stations.values()),
            "running": sum(s.running for s in self.stations.values()),
            "llm_requests": llm.requests if llm else 0,
            "llm_retries": llm.retries if llm else 0,
            "step_retries": self.step_retries,
            "dropped": self.dropped,
        }

    async def _worker(self, station: Station) -> None:
        while True:
            msg = await station.queue.get()
            station.running += 1
            kept = False
            try:
                kept = await self._process(station, msg)
            except Exception as exc:  # never let one row stop a worker; its driver delivers it again
                logger.exception("agent %s could not carry row %s on", station.name, msg.id)
                await self._report_lost(msg, f"{station.name}: {type(exc).__name__}: {exc}")
            finally:
                station.running -= 1
                if not kept:
                    self._let_go(msg)

    def _let_go(self, msg: Orchestrator) -> None:
        """The message left this agent: its audit entry goes, and its row's newest delivery with it."""
        self.held.pop((msg.key, msg.delivery), None)
        if self.newest.get(msg.key) == msg.delivery:
            del self.newest[msg.key]

    def _stale(self, msg: Orchestrator) -> bool:
        """A delivery past its deadline or superseded by a newer one: its driver no longer waits for it."""
        return time.time() > msg.deadline or msg.delivery < self.newest.get(msg.key, 0)

    async def _report(self, msg: Orchestrator, kind: str, payload: Any) -> None:
        """Tell the row's driver; a driver that is restarting gets a few more tries, a dead one none."""
        for attempt in range(_REPORT_TRIES):
            try:
                await self.peers.to_driver(msg.partition).put((kind, msg.key, msg.delivery, payload))
                return
            except RayError:
                await asyncio.sleep(min(0.2 * (attempt + 1), 2.0))
        # The driver is gone: its units are redone by another, and this row with them.
        logger.warning("driver %s of row %s is unreachable; dropping its %s report", msg.partition, msg.id, kind)

    async def _report_lost(self, msg: Orchestrator, reason: str) -> None:
        await self._report(msg, "lost", reason)

    async def _process(self, station: Station, msg: Orchestrator) -> bool:
        """One step of `msg`; True when the message stays in this agent (handed to a chained role)."""
        if self._stale(msg):
            self.dropped += 1
            return False
        try:
            await msg.materialize()
        except Exception as exc:  # the owner of an offloaded payload died
            await self._report_lost(msg, f"offloaded payload lost: {type(exc).__name__}")
            return False
        started = time.monotonic()
        prompt, completion = msg.usage["prompt_tokens"], msg.usage["completion_tokens"]
        await self._run_step(station, msg)
        station.metrics.step(
            time.monotonic() - started,
            msg.usage["prompt_tokens"] - prompt,
            msg.usage["completion_tokens"] - completion,
        )
        msg.hops += 1
        next_role = None if msg.done else msg.route(station.name)
        if next_role is not None and msg.hops >= self.spec.orchestrator.max_hops:
            msg.finish(
                ERROR,
                f"routing loop: {msg.hops} steps without finishing (orchestrator.max_hops), last {station.name!r}",
            )
            next_role = None
        if next_role is None:
            if not msg.done:
                msg.finish(ERROR, f"pipeline routing after {station.name!r} named no role and no status")
            await self._release_sandbox(msg)
            await self._report(msg, "done", output_row(self.pipeline, msg))
            return False
        if self._stale(msg):  # superseded while it ran: the newer delivery carries the row
            self.dropped += 1
            return False
        msg.next_role = next_role
        chained = self.stations.get(next_role)
        if chained is not None:
            chained.queue.put_nowait(msg)
            return True
        msg.offload(self.spec.orchestrator.offload_bytes)
        try:
            await hand_off(self.peers, next_role, msg)
        except RuntimeError as exc:
            await self._report_lost(msg, str(exc))
        return False

    async def _release_sandbox(self, msg: Orchestrator) -> None:
        """Free the row's sandbox before its slot is wanted by the next row; a failure here only
        leaves the lease to its TTL, the row is reported anyway."""
        if self.sandbox is None:
            return
        try:
            await self.sandbox.release(msg)
        except Exception:
            logger.warning("could not release the sandbox of row %s", msg.id, exc_info=True)

    async def _run_step(self, station: Station, msg: Orchestrator) -> None:
        spec = station.spec
        for attempt in range(spec.retries + 1):
            reason, retryable = await self._attempt(station, msg)
            if reason is None:
                return
            if not retryable or attempt == spec.retries:
                break
            station.metrics.retry()
            self.step_retries += 1
            await asyncio.sleep(spec.backoff_s * (2**attempt))
        station.metrics.error()
        msg.finish(ERROR, reason)

    async def _attempt(self, station: Station, msg: Orchestrator) -> tuple[str | None, bool]:
        """Run the role once: (None, _) on success, else (reason, whether a retry may help).

        The timeout is a deadline on this task (`asyncio.timeout`), not a task of its own per step.
        """
        name, timeout_s = station.name, station.spec.step_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await station.role.run(msg)
            return None, False
        except RowError as exc:
            return str(exc), False
        except LLMError as exc:
            return f"{name}: {exc}", exc.retryable
        except TimeoutError:
            return f"{name}: step timed out after {timeout_s:g}s", True
        except Exception as exc:
            return f"{name}: {type(exc).__name__}: {exc}", True
