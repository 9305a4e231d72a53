"""Fencing: one live run per output.

A run takes the output by creating `_leases/<generation>` with a conditional create (one past the
highest there) and then pointing `_lease.json` at it; it renews `_lease.json`'s heartbeat every
`HEARTBEAT_S` while it runs and marks it released at the end. A generation is fenced off for good
once the next one exists: `_leases/` only grows, so no late write can undo a takeover.
A second run finds a live holder and is refused with its name. A holder is live while its
heartbeat is younger than `TTL_S`, except that a holder on this host whose process is gone (a
SIGKILLed run) is dead at once. Drivers check the generation before every unit commit, so a
stale writer (an actor left from a run whose lease was taken over) never commits anything.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import psutil

from matrix_provider.runtime.sink import OutputError, OutputStore

LEASE_FILE = "_lease.json"
LEASES_DIR = "_leases"
TTL_S = 60.0
HEARTBEAT_S = 10.0


class StaleRun(RuntimeError):
    """Another run took this output over: this run must not commit anything more."""


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def read_lease(store: OutputStore) -> dict[str, Any] | None:
    path = store.path(LEASE_FILE)
    try:
        return json.loads(store.fs.cat_file(path))
    except FileNotFoundError:
        return None


def holder_is_live(lease: dict[str, Any], now: float | None = None) -> bool:
    if lease.get("released"):
        return False
    if (now or time.time()) - lease.get("heartbeat", 0) > TTL_S:
        return False
    if lease.get("host") == socket.gethostname():
        started = _process_start(int(lease.get("pid", -1)))
        return started is not None and abs(started - lease.get("pid_started", 0)) < 1.0
    return True


def describe(lease: dict[str, Any]) -> str:
    age = time.time() - lease.get("heartbeat", 0)
    return (
        f"run {lease.get('run_id')} (generation {lease.get('generation')}, pid {lease.get('pid')} on "
        f"{lease.get('host')}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(lease.get('started', 0)))} "
        f"UTC, last heartbeat {age:.0f}s ago)"
    )


def _generation_path(store: OutputStore, generation: int) -> str:
    return store.path(f"{LEASES_DIR}/{generation:08d}.json")


def highest_generation(store: OutputStore) -> int:
    folder = store.path(LEASES_DIR)
    store.fs.invalidate_cache(folder)
    try:
        names = store.fs.ls(folder, detail=False)
    except FileNotFoundError:
        return 0
    numbers = [int(n.rsplit("/", 1)[-1].split(".")[0]) for n in names if n.endswith(".json")]
    return max(numbers, default=0)


def check_generation(store: OutputStore, generation: int) -> None:
    """Raise StaleRun once a later generation exists (a run took the output over)."""
    successor = _generation_path(store, generation + 1)
    store.fs.invalidate_cache(store.path(LEASES_DIR))
    if store.retrying(lambda: store.fs.exists(successor)):
        lease = read_lease(store)
        holder = describe(lease) if lease else "another run"
        raise StaleRun(f"output {store.uri!r} was taken over by {holder}; generation {generation} stops")


class Lease:
    """This run's hold on an output; a context manager that renews it in a background thread."""

    def __init__(self, store: OutputStore, run_id: str):
        self.store = store
        self.run_id = run_id
        self.generation = 0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, **extra: Any) -> bytes:
        now = time.time()
        pid = os.getpid()
        record = {
            "generation": self.generation,
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_started": _process_start(pid),
            "started": getattr(self, "_started", now),
            "heartbeat": now,
            **extra,
        }
        return json.dumps(record).encode()

    def acquire(self) -> None:
        current = read_lease(self.store)
        if current is not None and holder_is_live(current):
            raise OutputError(
                f"output {self.store.uri!r} is held by {describe(current)}: wait for it to finish or stop it"
            )
        previous = int(current["generation"]) if current else 0
        # From the listing too: a run killed between its two writes left a generation `_lease.json` lacks.
        self.generation = max(previous, highest_generation(self.store)) + 1
        self._started = time.time()
        if not self.store.create(f"{LEASES_DIR}/{self.generation:08d}.json", self._record()):
            raise OutputError(
                f"output {self.store.uri!r} was taken by another run just now (generation {self.generation})"
            )
        self.store.retrying(lambda: self.store.put(LEASE_FILE, self._record()))
        self._thread = threading.Thread(target=self._renew, name="matrix-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                check_generation(self.store, self.generation)
                self.store.put(LEASE_FILE, self._record())
            except StaleRun as exc:
                self.lost = str(exc)
                return
            except Exception:  # a storage blip: the next beat tries again, well within TTL_S
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost is None and self.generation:
            try:
                check_generation(self.store, self.generation)
            except StaleRun:
                return
            self.store.put(LEASE_FILE, self._record(released=True))

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
