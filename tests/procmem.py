"""Peak memory of one run: the `matrix run` job process and the Ray worker processes of our actors.

USS (pages only this process holds) and PSS (its fair share of shared pages) are what grow when a
process keeps state; RSS also counts the shared libraries and object-store pages every Ray worker
maps, which hides that growth. Ray titles an actor's worker process `ray::<Class>` when it waits
`ray::<Class>.<method>` while it runs a method, `ray::<actor name>:<Class>.__init__` while a
named actor is constructed, and `ray::IDLE` before it hosts an actor; so the class name is read
from the title at every sample.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import psutil

# Actor classes of the runtime, old and new; a class not listed is reported by `PeakMemory.others`.
ACTOR_CLASSES = ("Agent", "PartitionDriver")
JOB = "job"
_RAY_OWN = frozenset({"IDLE", "DashboardAgent", "RuntimeEnvAgent"})  # Ray's own, never ours
_MB = 1 << 20
# `ray::Agent`, `ray::Agent.enqueue_many`, and `ray::<actor name>:Agent.__init__` while a named actor starts.
_TITLE = re.compile(r"^ray::(?:[^:\s]+:)?(?P<cls>[A-Za-z_]\w*)(?:\.\w+)?$")
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied)


@dataclass
class Peak:
    """The highest USS and PSS one process showed, in bytes."""

    kind: str
    pid: int
    uss: int = 0
    pss: int = 0
    samples: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "pid": self.pid,
            "uss_mb": round(self.uss / _MB, 1),
            "pss_mb": round(self.pss / _MB, 1),
            "samples": self.samples,
        }


def ray_title(proc: psutil.Process) -> str | None:
    """`ray::Agent.enqueue_many` for a Ray worker (its rewritten argv), None for other processes."""
    cmdline = proc.cmdline()
    title = " ".join(cmdline).strip() if cmdline else ""
    return title if title.startswith("ray::") else None


def actor_class(title: str) -> str | None:
    """`ray::Agent.enqueue_many` or `ray::matrix-1-agent-x-0:Agent.__init__` -> `Agent`, else None."""
    found = _TITLE.match(title)
    return found["cls"] if found else None


def raylet_pid(gcs_address: str) -> int | None:
    """The raylet (parent of the workers) of the cluster whose GCS listens on `gcs_address`.

    Matched by port only: the raylet names the GCS by the node's own IP even when the head was
    started with `--node-ip-address=127.0.0.1`. On a multi-node cluster, the first raylet found.
    """
    suffix = ":" + gcs_address.rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["name", "cmdline"]):
        args = proc.info["cmdline"] or []
        if proc.info["name"] == "raylet" and any(a.startswith("--gcs-address=") and a.endswith(suffix) for a in args):
            return proc.pid
    return None


class PeakMemory:
    """Samples the job process and our actors' workers in a background thread, keeping peaks.

    Workers are looked for among the descendants of `under` (default: the job itself, which is
    where a local Ray puts them); pass the raylet's pid (`raylet_pid`) for a run that joins an
    existing cluster, so that a run of another cluster on the same machine is never counted.
    """

    def __init__(
        self,
        root_pid: int,
        match: Iterable[str] = ACTOR_CLASSES,
        *,
        under: int | None = None,
        interval: float = 0.25,
    ) -> None:
        self.root_pid = root_pid
        self.match = frozenset(match)
        self.under = root_pid if under is None else under
        self.interval = interval
        self._peaks: dict[str, Peak] = {}
        self._others: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)
        self._procs: dict[int, psutil.Process] = {}

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def _process(self, pid: int) -> psutil.Process:
        """One psutil handle per pid, so a pid reused by a new process is told apart (create time)."""
        proc = self._procs.get(pid)
        if proc is None or not proc.is_running():
            proc = self._procs[pid] = psutil.Process(pid)
        return proc

    def _workers(self) -> list[tuple[str, psutil.Process]]:
        """(class, process) for every descendant of `under` titled as one of our actors now."""
        try:
            children = self._process(self.under).children(recursive=True)
        except _GONE:
            return []
        found = []
        for child in children:
            try:
                title = ray_title(child)
            except _GONE:
                continue
            cls = actor_class(title) if title else None
            if cls in self.match:
                found.append((cls, child))
            elif title and cls not in _RAY_OWN:
                self._others.add(title)
        return found

    def sample(self) -> None:
        """One pass over the job and the workers; a process that vanished meanwhile is skipped."""
        targets: list[tuple[str, str, psutil.Process]] = []
        with contextlib.suppress(*_GONE):
            targets.append((JOB, JOB, self._process(self.root_pid)))
        targets += [(f"ray::{cls}#{proc.pid}", cls, proc) for cls, proc in self._workers()]
        for label, kind, proc in targets:
            try:
                info = proc.memory_full_info()
            except _GONE:
                continue
            peak = self._peaks.setdefault(label, Peak(kind, proc.pid))
            peak.uss = max(peak.uss, info.uss)
            peak.pss = max(peak.pss, getattr(info, "pss", 0))
            peak.samples += 1

    def peaks(self) -> dict[str, dict[str, object]]:
        """Per process, keyed `job` or `ray::<Class>#<pid>`: kind, pid, peak uss_mb / pss_mb, samples."""
        return {label: peak.as_dict() for label, peak in sorted(self._peaks.items())}

    def max_by_kind(self, metric: Literal["uss", "pss"] = "uss") -> dict[str, float]:
        """Per kind (`job`, `Agent`, ...): the largest per-process peak of `metric`, in MB."""
        out: dict[str, float] = {}
        for peak in self._peaks.values():
            out[peak.kind] = max(out.get(peak.kind, 0.0), round(getattr(peak, metric) / _MB, 1))
        return dict(sorted(out.items()))

    def others(self) -> set[str]:
        """Titles of Ray workers in scope that were not counted (an actor class missing from `match`)."""
        return set(self._others)
