"""Fencing: one live run per output, judged by the store's own clock.

A run takes an output by creating `_leases/<generation>.json` with a conditional create, one past
the highest generation there; the highest generation is the holder. The file names the content
epoch the run writes (see `sink.py`). The holder rewrites its own file every heartbeat, so the
file's modification time, set by the store, is its heartbeat. A reader judges it against the
modification time of a probe object it writes itself at that moment, so neither machine's clock
is trusted. A holder on this host whose process is gone (a SIGKILLed run) is dead at once.

A generation is fenced off for good once the next one exists: `_leases/` only grows, and a run
may only create the generation right after the one it judged dead, so two runs that raced for a
dead holder cannot both win. Every mutation of an output checks the fence just before it is made
(`check_generation`), and a run that finds itself fenced off stops and exits non-zero naming the
run that took over.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from matrix_provider.runtime.sink import OutputError, OutputStore

LEASES_DIR = "_leases"
DEFAULT_TTL_S = 60.0


class StaleRun(RuntimeError):
    """Another run took this output over: this run must not change anything more."""


@dataclass(frozen=True)
class Holder:
    """The highest generation's lease file, as read at one moment."""

    generation: int
    record: dict[str, Any]
    age_s: float  # by the store's clock: the probe's modification time minus the file's

    @property
    def epoch(self) -> int | None:
        return self.record.get("epoch")

    def is_live(self) -> bool:
        record = self.record
        if record.get("released"):
            return False
        if self.age_s > float(record.get("ttl_s", DEFAULT_TTL_S)):
            return False
        if record.get("host") == socket.gethostname():
            started = _process_start(int(record.get("pid", -1)))
            return started is not None and abs(started - record.get("pid_started", 0)) < 1.0
        return True

    def describe(self) -> str:
        r = self.record
        return (
            f"run {r.get('run_id')} (generation {self.generation}, pid {r.get('pid')} on {r.get('host')}, "
            f"last heartbeat {self.age_s:.0f}s ago{', released' if r.get('released') else ''})"
        )


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _generation_name(generation: int) -> str:
    return f"{LEASES_DIR}/{generation:08d}.json"


def _generations(store: OutputStore) -> dict[int, float]:
    """{generation: modification time} of every lease file, from one listing."""
    found: dict[int, float] = {}
    for name, mtime in store.listing(LEASES_DIR).items():
        stem = name.removesuffix(".json")
        if name.endswith(".json") and stem.isdigit():
            found[int(stem)] = mtime
    return found


def read_holder(store: OutputStore) -> Holder | None:
    """The highest generation's lease, its age judged by the store's clock; None for a fresh output."""
    now = store.now()
    generations = _generations(store)
    if not generations:
        return None
    generation = max(generations)
    try:
        record = json.loads(store.fs.cat_file(store.path(_generation_name(generation))))
    except (FileNotFoundError, ValueError):  # a file cut by power loss: a dead holder
        record = {}
    return Holder(generation, record, max(0.0, now - generations[generation]))


def check_generation(store: OutputStore, generation: int) -> None:
    """Raise StaleRun once a later generation exists (a run took the output over)."""
    successor = store.path(_generation_name(generation + 1))
    store.fs.invalidate_cache(store.path(LEASES_DIR))
    if store.retrying(lambda: store.fs.exists(successor)):
        holder = read_holder(store)
        taker = holder.describe() if holder else "another run"
        raise StaleRun(f"output {store.uri!r} was taken over by {taker}; this run (generation {generation}) stopped")


class Lease:
    """This run's hold on an output; a context manager that renews it in a background thread."""

    def __init__(self, store: OutputStore, run_id: str, ttl_s: float = DEFAULT_TTL_S):
        self.store = store
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.generation = 0
        self.epoch = 0
        self.previous: Holder | None = None
        self.lost: str | None = None
        self._record: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, choose_epoch: Callable[[Holder | None, int], int]) -> None:
        """Take the output unless a live run holds it. `choose_epoch(previous holder, generation)`
        names the content epoch this run writes (raising OutputError refuses the output)."""
        holder = read_holder(self.store)
        if holder is not None and holder.is_live():
            raise OutputError(
                f"output {self.store.uri!r} is held by {holder.describe()}: wait for it to finish or stop it"
            )
        self.generation = (holder.generation if holder else 0) + 1
        self.epoch = choose_epoch(holder, self.generation)
        self.previous = holder
        pid = os.getpid()
        self._record = {
            "generation": self.generation,
            "epoch": self.epoch,
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_started": _process_start(pid),
            "ttl_s": self.ttl_s,
        }
        if not self.store.create(_generation_name(self.generation), json.dumps(self._record).encode()):
            raise OutputError(
                f"output {self.store.uri!r} was taken by another run just now (generation {self.generation})"
            )
        self._thread = threading.Thread(target=self._renew, name="matrix-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise StaleRun if this run no longer holds the output (the fence before every mutation)."""
        if self.lost is not None:
            raise StaleRun(self.lost)
        try:
            check_generation(self.store, self.generation)
        except StaleRun as exc:
            self.lost = str(exc)
            raise

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 6):
            try:
                self.check()
                self.store.put(_generation_name(self.generation), json.dumps(self._record).encode())
            except StaleRun:
                return
            except Exception:  # a storage blip: the next beat tries again, well within the TTL
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost is None and self.generation:
            try:
                self.check()
            except StaleRun:
                return
            self.store.put(_generation_name(self.generation), json.dumps({**self._record, "released": True}).encode())


def choose_epoch(
    store: OutputStore, holder: Holder | None, generation: int, meta: dict[str, Any], overwrite: bool
) -> int:
    """The content epoch a run writes: its predecessor's when the config is the same (a resume), a new
    one (this run's generation) on a fresh output or with `--overwrite`; a different config without
    `--overwrite` is refused. Reads only: the lease is not taken yet."""
    previous = store.read_epoch(holder.epoch) if holder is not None and holder.epoch is not None else None
    if previous is None:
        if store.legacy_layout() and not overwrite:
            raise OutputError(
                f"output {store.uri!r} was written by matrix-provider 0.1 (a `_matrix.json` output): "
                "use a new output or pass --overwrite"
            )
        return generation
    if overwrite:
        return generation
    if previous.get("config_hash") != meta["config_hash"]:
        raise OutputError(
            f"output {store.uri!r} holds a run of a different config "
            f"(pipeline {previous.get('pipeline')!r}, config_hash {previous.get('config_hash')}; "
            f"this run is {meta['config_hash']}): use a new output or pass --overwrite"
        )
    return int(holder.epoch)  # type: ignore[union-attr,arg-type]


def take_output(
    store: OutputStore, run_id: str, meta: dict[str, Any], overwrite: bool, ttl_s: float = DEFAULT_TTL_S
) -> tuple[Lease, dict[str, Any]]:
    """Take the output for a run of the config `meta` describes (`config_hash`, `split_bytes`, ...):
    the lease, the epoch it writes opened (a new one recorded) or resumed, `_SUCCESS` and the manifest
    removed. Returns the lease (release it when the run ends) and the epoch's meta, whose unit size
    wins on a resume. Shared by `matrix run` and `matrix dedup`."""
    lease = Lease(store, run_id, ttl_s)
    lease.acquire(lambda holder, generation: choose_epoch(store, holder, generation, meta, overwrite))
    try:
        epoch_meta = store.read_epoch(lease.epoch)
        if epoch_meta is None:  # a new epoch (or one whose opener died before recording it)
            store.create_epoch(lease.epoch, meta, lease.check)
            epoch_meta = store.read_epoch(lease.epoch) or meta
        store.unmark(lease.check)
    except BaseException:
        lease.release()
        raise
    return lease, epoch_meta
