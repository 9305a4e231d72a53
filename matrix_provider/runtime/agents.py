"""Agents: stateless role replicas as async Ray actors, handing messages straight to each other.

An agent takes a message from its queue, runs its role (with a per-step timeout and retries with
backoff), asks the orchestrator who acts next and enqueues the message directly on a replica of
that role; a finished row goes to its partition driver. Messages for the same role or driver that
meet while a call to it is under way share the next Ray call (`outbox.Outbox`).

Flow control cannot deadlock, whatever the routing graph (loops included): enqueueing never waits.
Drivers bound rows in flight by credits (one per admitted row), and a row is one message, so every
queue together holds at most the rows in flight. An agent drops a delivery whose deadline passed or
that a newer delivery of the same row superseded, and ends a row that loops past
`orchestrator.max_hops` as an error. A row it cannot carry on (its offloaded payload is gone, no
replica of the next role answers) is reported to its driver, which delivers it again at once.
The agent keeps every message it holds in `held`, for the audit its driver runs after an agent died.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from matrix_provider.llm.client import ClientConfig, LLMClient, LLMError
from matrix_provider.runtime import names
from matrix_provider.runtime.metrics import TOKEN_KINDS, RoleMetrics
from matrix_provider.runtime.orchestrator import ERROR, Orchestrator
from matrix_provider.runtime.outbox import Outbox
from matrix_provider.runtime.pipeline import load_pipeline, output_row
from matrix_provider.runtime.roles import RowError
from matrix_provider.runtime.spec import PipelineSpec
from matrix_provider.sandbox.client import SandboxClient

_HANDOFF_TRIES = 30
_LOOKUP_S = 0.2  # while some replicas of a role have not started, look their names up this often
_REPORT_TRIES = 10
logger = logging.getLogger(__name__)
# To a driver: ("done", key, delivery, output row) or ("lost", key, delivery, reason).
Report = tuple[str, str, int, Any]


class PeerMissing(LookupError):
    """A peer's name does not resolve yet: its actor starts in the run's second wave."""


class PeerDirectory:
    """Lazily resolved handles of the other actors of a run (names survive actor restarts)."""

    def __init__(self, run_id: str, replicas: dict[str, int]):
        self.run_id = run_id
        self.replicas = replicas
        self._agents: dict[str, list[Any]] = {}
        self._looked_up: dict[str, float] = {}
        self._drivers: dict[int, Any] = {}
        self._turn = {role: itertools.count() for role in replicas}
        self._to_role: dict[str, Outbox[Orchestrator]] = {}
        self._to_driver: dict[int, Outbox[Report]] = {}

    def agent(self, role: str) -> Any:
        """The next replica of `role` in turn, among those started."""
        handles = self._agents.get(role, [])
        if len(handles) < self.replicas[role] and time.monotonic() - self._looked_up.get(role, 0.0) > _LOOKUP_S:
            handles = self._agents[role] = self._resolve(role)
        if not handles:
            raise PeerMissing(f"no replica of role {role!r} has started yet")
        return handles[next(self._turn[role]) % len(handles)]

    def all_agents(self) -> list[Any]:
        """Every agent of the run; PeerMissing while some have not started."""
        for role in self.replicas:
            if len(self._agents.get(role, [])) < self.replicas[role]:
                self._agents[role] = self._resolve(role)
                if len(self._agents[role]) < self.replicas[role]:
                    raise PeerMissing(f"not every replica of role {role!r} has started yet")
        return [h for handles in self._agents.values() for h in handles]

    def _resolve(self, role: str) -> list[Any]:
        self._looked_up[role] = time.monotonic()
        found = []
        for i in range(self.replicas[role]):
            try:
                found.append(ray.get_actor(names.agent_name(self.run_id, role, i), namespace=names.NAMESPACE))
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
        """Batched `enqueue_many` calls; each batch goes to the next replica of `role`."""
        if role not in self._to_role:
            self._to_role[role] = Outbox(lambda msgs: self.agent(role).enqueue_many.remote(msgs))
        return self._to_role[role]

    def to_driver(self, partition: int) -> Outbox[Report]:
        """Batched `reports` calls to the driver of `partition`."""
        if partition not in self._to_driver:
            self._to_driver[partition] = Outbox(lambda items: self.driver(partition).reports.remote(items))
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


@ray.remote(max_restarts=-1, max_task_retries=0)
class Agent:
    def __init__(self, run_id: str, role: str, spec_json: str, client_config: ClientConfig | None):
        self.spec = PipelineSpec.model_validate_json(spec_json)
        self.pipeline = load_pipeline(self.spec.pipeline)
        self.role_name = role
        self.role_spec = self.spec.roles[role]
        role_cls = self.pipeline.roles[role]
        self.llm = LLMClient(client_config) if role_cls.uses_llm and client_config else None
        self.sandbox = SandboxClient.named(run_id, self.spec.sandbox.pools) if self.pipeline.uses_sandbox else None
        self.role = role_cls(role, self.role_spec, self.spec.params, self.llm, self.sandbox)
        self.peers = PeerDirectory(run_id, {r: s.replicas for r, s in self.spec.roles.items()})
        self.metrics = RoleMetrics(self.pipeline.name, role)
        self.incarnation_id = uuid.uuid4().hex  # new after every restart: the run's supervisor watches it
        self.held: dict[tuple[str, int], int] = {}
        self.newest: dict[str, int] = {}
        self.queue: asyncio.Queue[Orchestrator] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.running = 0
        self.step_retries = 0
        self.dropped = 0

    def _start(self) -> asyncio.Queue[Orchestrator]:
        if self.queue is None:
            self.queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            workers = [self._worker() for _ in range(self.role_spec.max_concurrency)]
            self.tasks = [loop.create_task(c) for c in (*workers, self._report_load())]  # held: never collected
        return self.queue

    async def _report_load(self) -> None:
        """Queue length and steps in flight, every second: Ray drops a gauge that is not set again
        within two export intervals, so a queue that holds still must still be reported."""
        while True:
            self.metrics.queue.set(self.queue.qsize() if self.queue else 0)
            self.metrics.in_flight.set(self.running)
            await asyncio.sleep(1.0)

    async def incarnation(self) -> str:
        """Also the run's readiness call: the workers start here, before the first row comes."""
        self._start()
        return self.incarnation_id

    async def enqueue_many(self, msgs: list[Orchestrator]) -> None:
        """Accept messages; never waits (drivers' credits bound what is in flight)."""
        queue = self._start()
        for msg in msgs:
            self.held[(msg.key, msg.delivery)] = msg.partition
            self.newest[msg.key] = max(self.newest.get(msg.key, 0), msg.delivery)
            queue.put_nowait(msg)

    async def held_rows(self, partition: int) -> list[tuple[str, int]]:
        """[(row key, delivery)] of `partition` held here, for its driver's loss audit."""
        return [key for key, p in self.held.items() if p == partition]

    async def stats(self) -> dict[str, Any]:
        llm = self.llm.stats if self.llm else None
        return {
            "role": self.role_name,
            "queued": self.queue.qsize() if self.queue else 0,
            "running": self.running,
            "llm_requests": llm.requests if llm else 0,
            "llm_retries": llm.retries if llm else 0,
            "step_retries": self.step_retries,
            "dropped": self.dropped,
        }

    async def _worker(self) -> None:
        assert self.queue is not None
        while True:
            msg = await self.queue.get()
            self.running += 1
            try:
                await self._process(msg)
            except Exception as exc:  # never let one row stop a worker; its driver delivers it again
                logger.exception("agent %s could not carry row %s on", self.role_name, msg.id)
                await self._report_lost(msg, f"{self.role_name}: {type(exc).__name__}: {exc}")
            finally:
                self.running -= 1
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

    async def _process(self, msg: Orchestrator) -> None:
        if self._stale(msg):
            self.dropped += 1
            return
        try:
            await msg.materialize()
        except Exception as exc:  # the owner of an offloaded payload died
            await self._report_lost(msg, f"offloaded payload lost: {type(exc).__name__}")
            return
        started = time.monotonic()
        before = dict(msg.usage)
        await self._run_step(msg)
        self.metrics.latency.observe(time.monotonic() - started)
        self.metrics.processed.inc()
        for kind in TOKEN_KINDS:
            spent = msg.usage[f"{kind}_tokens"] - before[f"{kind}_tokens"]
            if spent > 0:
                self.metrics.tokens.inc(spent, {"kind": kind})
        msg.hops += 1
        next_role = None if msg.done else msg.route(self.role_name)
        if next_role is not None and msg.hops >= self.spec.orchestrator.max_hops:
            msg.finish(
                ERROR,
                f"routing loop: {msg.hops} steps without finishing (orchestrator.max_hops), last {self.role_name!r}",
            )
            next_role = None
        if next_role is None:
            if not msg.done:
                msg.finish(ERROR, f"pipeline routing after {self.role_name!r} named no role and no status")
            await self._release_sandbox(msg)
            await self._report(msg, "done", output_row(self.pipeline, msg))
            return
        if self._stale(msg):  # superseded while it ran: the newer delivery carries the row
            self.dropped += 1
            return
        msg.next_role = next_role
        msg.offload(self.spec.orchestrator.offload_bytes)
        try:
            await hand_off(self.peers, next_role, msg)
        except RuntimeError as exc:
            await self._report_lost(msg, str(exc))

    async def _release_sandbox(self, msg: Orchestrator) -> None:
        """Free the row's sandbox before its slot is wanted by the next row; a failure here only
        leaves the lease to its TTL, the row is reported anyway."""
        if self.sandbox is None:
            return
        try:
            await self.sandbox.release(msg)
        except Exception:
            logger.warning("could not release the sandbox of row %s", msg.id, exc_info=True)

    async def _run_step(self, msg: Orchestrator) -> None:
        spec = self.role_spec
        for attempt in range(spec.retries + 1):
            reason, retryable = await self._attempt(msg)
            if reason is None:
                return
            if not retryable or attempt == spec.retries:
                break
            self.metrics.retries.inc()
            self.step_retries += 1
            await asyncio.sleep(spec.backoff_s * (2**attempt))
        self.metrics.errors.inc()
        msg.finish(ERROR, reason)

    async def _attempt(self, msg: Orchestrator) -> tuple[str | None, bool]:
        """Run the role once: (None, _) on success, else (reason, whether a retry may help)."""
        try:
            await asyncio.wait_for(self.role.run(msg), timeout=self.role_spec.step_timeout_s)
            return None, False
        except RowError as exc:
            return str(exc), False
        except LLMError as exc:
            return f"{self.role_name}: {exc}", exc.retryable
        except TimeoutError:
            return f"{self.role_name}: step timed out after {self.role_spec.step_timeout_s:g}s", True
        except Exception as exc:
            return f"{self.role_name}: {type(exc).__name__}: {exc}", True
