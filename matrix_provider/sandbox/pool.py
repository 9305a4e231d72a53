"""A pool of sandboxed tool workers, one per lease (a trajectory), bounded per pool.

The pool owns no trajectory state it cannot rebuild: a worker's host state is rebuilt from the
`history` every call carries (the lease's earlier successful calls), replayed whenever a lease gets
a new worker — after a timeout, a crash, a TTL expiry or a restart of the pool itself. So a worker
can be killed at any moment, and a restarted pool actor needs no recovery of its own.

`SandboxPool` is a plain class with async methods, so an asyncio program can use it in-process;
`SandboxPoolActor` is the same class as an asyncio Ray actor for the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ray

from matrix_provider.sandbox import backends
from matrix_provider.sandbox.spec import SandboxSpec

logger = logging.getLogger(__name__)
_START_S = 30.0  # a cold worker's interpreter start and host import, allowed on top of init's call_timeout_s
_MAX_LINE = 64 << 20  # largest reply line read from a worker
_EXIT_S = 10.0  # a killed or closed worker's exit (and its pipes' close) awaited at most this long
_BIG = 100_000  # async actor: concurrency is bounded by pool_size, not by Ray


class WorkerLost(Exception):
    """The worker did not answer (timeout, death, garbage) and is gone; the text completes
    "tool 'NAME' …"."""


class SandboxError(RuntimeError):
    """The tool host cannot be set up (import or factory failed): the row cannot go on."""


class Worker:
    """One sandboxed worker process, the leader of its own process group."""

    def __init__(self, proc: asyncio.subprocess.Process, spec: SandboxSpec):
        self.proc = proc
        self.spec = spec

    @classmethod
    async def start(cls, spec: SandboxSpec, host: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            *backends.command(spec, host),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=backends.environment(spec),
            start_new_session=True,
            limit=_MAX_LINE,
        )
        return cls(proc, spec)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def request(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and read its reply; raises WorkerLost (the worker is then dead)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                self.proc.stdin.write(json.dumps(payload).encode() + b"\n")
                await self.proc.stdin.drain()
                line = await self.proc.stdout.readline()
        except TimeoutError:
            await self.kill()
            raise WorkerLost(f"did not finish within {timeout:g}s and was stopped") from None
        except ConnectionError:  # its stdin closed: it died
            line = b""
        except ValueError:  # a reply line over the limit
            await self.kill()
            raise WorkerLost(f"returned more than {_MAX_LINE >> 20} MiB and was stopped") from None
        if not line:
            if not await self._exited():
                await self.kill()
            raise WorkerLost(f"was stopped: its sandbox died ({self._exit_reason()})")
        try:
            reply = json.loads(line)
            return {"content": str(reply["content"]), "error": bool(reply["error"])}
        except (ValueError, KeyError, TypeError):
            await self.kill()
            raise WorkerLost("was stopped: its sandbox broke the reply protocol") from None

    def _exit_reason(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "its exit was not seen"
        # Signals show as -N from a plain subprocess, as 128+N from bwrap, which relays its child's.
        number = -code if code < 0 else code - 128 if code > 128 else 0
        if number == signal.SIGXCPU:
            return f"CPU time limit of {self.spec.cpu_seconds}s reached"
        if number:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(number).name}"
        return f"exit status {code}"

    async def kill(self) -> None:
        """SIGKILL the whole process group; bwrap's --die-with-parent takes the sandbox along."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if not await self._exited():
            pid = self.proc.pid
            logger.error("sandbox worker %d: no exit seen %gs after SIGKILL; going on without it", pid, _EXIT_S)

    async def _exited(self) -> bool:
        """Wait, at most _EXIT_S, for the exit. asyncio's wait() also waits for the pipes to close,
        which a process left holding them could delay forever: the pool must not hang on it."""
        try:
            async with asyncio.timeout(_EXIT_S):
                await self.proc.wait()
        except TimeoutError:
            return False
        return True


@dataclass
class _Lease:
    host: str
    used: float = field(default_factory=time.monotonic)
    worker: Worker | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # a lease's calls run one at a time


class SandboxPool:
    """Leases of sandboxed workers: at most `pool_size` processes, `warm` of them spares."""

    def __init__(self, spec: SandboxSpec):
        self.spec = spec
        self._leases: dict[str, _Lease] = {}
        self._spares: dict[str, list[Worker]] = {}
        self._starting: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(spec.pool_size)  # one per live process, spares included
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    async def call(
        self,
        lease: str,
        host: str,
        init: dict[str, Any],
        name: str,
        arguments: dict[str, Any],
        requestor: str,
        history: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """Run tool `name` in the lease's worker -> {"content": str, "error": bool}.

        A new worker for the lease (its first call, or after one was lost) is built with `init`
        and replays `history` first. Raises SandboxError when the host cannot be built.
        """
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._expire())
        state = self._leases.setdefault(lease, _Lease(host))
        async with state.lock:
            state.used = time.monotonic()
            try:
                if state.worker is None or not state.worker.alive:
                    await self._attach(lease, state, init, history)
                assert state.worker is not None
                payload = {"op": "call", "name": name, "arguments": arguments, "requestor": requestor}
                return await state.worker.request(payload, self.spec.call_timeout_s)
            except WorkerLost as exc:
                await self._detach(state)
                return {"content": f"tool {name!r} {exc}", "error": True}
            except BaseException:
                await self._detach(state)
                raise
            finally:
                state.used = time.monotonic()

    async def release(self, lease: str) -> None:
        """End a lease and kill its worker; unknown or released leases are fine."""
        state = self._leases.pop(lease, None)
        if state is not None:
            await self._detach(state)

    async def live(self) -> int:
        """Live sandbox processes, warm spares included."""
        return sum(worker.alive for worker in self._workers())

    async def close(self) -> None:
        """Kill every worker and stop background work; the pool may be used again afterwards."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        await asyncio.gather(*self._tasks)  # spares being started: a few ms, then killed below
        leases, self._leases = self._leases, {}
        for state in leases.values():
            await self._detach(state)
        for spares in self._spares.values():
            while spares:
                await self._discard(spares.pop())

    # -- internals ------------------------------------------------------------------------------
    def _workers(self) -> list[Worker]:
        leased = [s.worker for s in self._leases.values() if s.worker is not None]
        return leased + [w for spares in self._spares.values() for w in spares]

    async def _attach(self, lease: str, state: _Lease, init: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Give the lease a new worker: init, then replay of its history (results ignored)."""
        await self._detach(state)
        worker = await self._acquire(state.host)
        if self._leases.get(lease) is not state:  # released while it waited for a slot
            await self._discard(worker)
            raise WorkerLost("was stopped: its lease was released")
        state.worker = worker
        reply = await worker.request({"op": "init", "init": init}, self.spec.call_timeout_s + _START_S)
        if reply["error"]:
            raise SandboxError(reply["content"])
        for past in history:
            payload = {"op": "call", "name": past["name"], "arguments": past["arguments"]}
            await worker.request({**payload, "requestor": past["requestor"]}, self.spec.call_timeout_s)

    async def _detach(self, state: _Lease) -> None:
        worker, state.worker = state.worker, None
        if worker is not None:
            await self._discard(worker)

    async def _discard(self, worker: Worker) -> None:
        await worker.kill()
        self._slots.release()

    async def _acquire(self, host: str) -> Worker:
        """A warm spare of `host` if any, else a new worker once a slot is free (waits, never fails)."""
        spares = self._spares.setdefault(host, [])
        worker = None
        while spares and worker is None:
            candidate = spares.pop(0)  # the oldest: the likeliest to have finished its imports
            if candidate.alive:
                worker = candidate
            else:
                await self._discard(candidate)
        if worker is None:
            if self._slots.locked():
                await self._evict_spare(host)
            await self._slots.acquire()
            try:
                worker = await Worker.start(self.spec, host)
            except BaseException:
                self._slots.release()
                raise
        task = asyncio.get_running_loop().create_task(self._top_up(host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return worker

    async def _evict_spare(self, host: str) -> None:
        """A full pool gives a spare of another host's slot to this one."""
        for other, spares in self._spares.items():
            if other != host and spares:
                await self._discard(spares.pop())
                return

    async def _top_up(self, host: str) -> None:
        """Start spares of `host` up to `warm`, only into slots no lease is waiting for."""
        spares = self._spares.setdefault(host, [])
        while len(spares) + self._starting[host] < self.spec.warm and not self._slots.locked():
            await self._slots.acquire()  # free and unwanted: returns at once
            self._starting[host] += 1
            try:
                spares.append(await Worker.start(self.spec, host))
            except OSError:
                self._slots.release()
                logger.exception("could not start a warm sandbox for %s", host)
                return
            finally:
                self._starting[host] -= 1

    async def _expire(self) -> None:
        """Release leases idle past lease_ttl_s: their agent died mid-row or never said it was done."""
        while True:
            await asyncio.sleep(min(self.spec.lease_ttl_s / 4, 10.0))
            cutoff = time.monotonic() - self.spec.lease_ttl_s
            for lease, state in list(self._leases.items()):
                if state.used < cutoff and not state.lock.locked():
                    logger.warning("sandbox lease %s idle for %gs: released", lease, self.spec.lease_ttl_s)
                    await self.release(lease)


SandboxPoolActor = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=_BIG)(SandboxPool)
