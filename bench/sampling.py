"""What the benchmark watches while a runner runs: the simulator's busy slot-time and the RSS of
every process involved, sampled from background threads."""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import defaultdict
from typing import Any

import psutil

from matrix_provider.llm.sim_server import sim_stats

_ACTIVE = 0.05  # a second with at least this busy share has rows flowing

# Process kinds for the RSS breakdown, matched on the process title Ray gives its workers.
_KINDS = (
    ("agents", "ray::Agent"),
    ("drivers", "ray::PartitionDriver"),
    ("simulator", "ray::SimReplica"),
    ("ray_data", "MapWorker"),
)


class Sampler:
    """Peak RSS (total and by process kind) and per-interval backend utilization."""

    def __init__(self, sim_name: str, replicas: int, interval_s: float = 1.0):
        self.sim_name, self.replicas = sim_name, replicas
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.peak_by_kind: dict[str, float] = defaultdict(float)
        self.busy: list[tuple[float, float, float]] = []  # (time, busy slot-s, in flight)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._rss, daemon=True),
            threading.Thread(target=self._sim, daemon=True),
        ]

    def __enter__(self) -> Sampler:
        stats = sim_stats(self.sim_name, self.replicas)
        self.slots = sum(int(s["slots"]) for s in stats)
        capacity = sum(s["capacity_tokens_per_s"] for s in stats)
        self.capacity_tokens_per_s = capacity if math.isfinite(capacity) else None  # an instant simulator has none
        self.busy.append(self._sim_now())
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.busy.append(self._sim_now())

    def _sim_now(self) -> tuple[float, float, float]:
        stats = sim_stats(self.sim_name, self.replicas)
        return time.monotonic(), sum(s["busy_slot_s"] for s in stats), sum(s["in_flight"] for s in stats)

    def _sim(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.busy.append(self._sim_now())

    def _rss(self) -> None:
        me = psutil.Process().pid
        while not self._stop.is_set():
            total, by_kind = 0.0, defaultdict(float)
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if proc.info["pid"] != me and "ray" not in cmd:
                    continue
                mb = proc.info["memory_info"].rss / 1e6 if proc.info["memory_info"] else 0.0
                total += mb
                kind = (
                    "bench_process" if proc.info["pid"] == me else next((k for k, t in _KINDS if t in cmd), "ray_other")
                )
                by_kind[kind] += mb
            self.peak_mb = max(self.peak_mb, total)
            for kind, mb in by_kind.items():
                self.peak_by_kind[kind] = max(self.peak_by_kind[kind], mb)
            self._stop.wait(0.5)

    def utilization(self) -> dict[str, Any]:
        """Busy slot-time over capacity: whole run, after the first request, and the median second."""
        capacity = self.slots
        (t0, b0, _), (t1, b1, _) = self.busy[0], self.busy[-1]
        whole = (b1 - b0) / (capacity * (t1 - t0))
        rates = [
            (bb - ba) / (capacity * (tb - ta))
            for (ta, ba, _), (tb, bb, _) in zip(self.busy, self.busy[1:], strict=False)
            if tb > ta
        ]
        first = next((i for i, r in enumerate(rates) if r >= _ACTIVE), len(rates))  # not the start-up probe
        active = rates[first:]
        start = self.busy[first][0]
        return {
            "backend_utilization": round(whole, 3),
            "startup_s": round(start - t0, 1),
            "backend_utilization_after_startup": round((b1 - b0) / (capacity * (t1 - start)), 3) if t1 > start else 0.0,
            "backend_utilization_median_s": round(statistics.median(active), 3) if active else 0.0,
            "utilization_trace": [round(r, 3) for r in rates],
        }
