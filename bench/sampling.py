"""What the benchmark watches while a runner runs, from one background thread: the simulator's
counters (busy slot-time, requests, prompt and completion tokens) every 0.25 s, and the CPU time
and PSS/USS of this process and its descendants (Ray's workers and our central shards) by kind.

Only descendants of this process are counted, so other Ray clusters on the machine are not; PSS
splits shared pages among the processes that map them, so summing it does not double-count.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections import defaultdict
from itertools import pairwise
from typing import Any

import psutil

from matrix_provider.llm.sim_server import sim_stats

_TICK_S = 0.25
_MB = 1 << 20
# Process kinds, matched on the title Ray gives its workers (`ray::Agent.enqueue_many`, ...).
_KINDS = (
    ("agents", "ray::Agent"),
    ("drivers", "ray::PartitionDriver"),
    ("simulator", "ray::SimReplica"),
    ("ray_data", "MapWorker"),
    ("ray_data", "ray::SplitCoordinator"),
    ("runner", "bench/cold.py"),
)
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def process_kind(proc: psutil.Process, me: int) -> str:
    """agents, drivers, simulator, ray_data, central_shard, bench_process, ray_idle (a Ray worker
    hosting nothing of ours) or ray_system (GCS, raylet, dashboard agent ...)."""
    if proc.pid == me:
        return "bench_process"
    cmd = " ".join(proc.cmdline())
    if "multiprocessing" in cmd:
        return "central_shard"
    kind = next((k for k, marker in _KINDS if marker in cmd), None)
    return kind or ("ray_idle" if cmd.startswith("ray::") else "ray_system")


class Sampler:
    """Samples until exited; the figures come from `utilization`, `cpu_ms_per_call` and `memory`."""

    def __init__(self, sim_name: str, replicas: int, in_flight_share: float = 0.2, probes: int = 0):
        """`in_flight_share`: the run's rows in flight over its rows; the steady state ends when
        about that share of the work is left, since fewer rows are in flight from then on.
        `probes`: requests the runner sends before its first row's (p2p checks the backend once)."""
        self.sim_name, self.replicas, self.probes = sim_name, replicas, probes
        self.steady_share = (0.1, max(0.3, min(0.8, 1 - in_flight_share)))
        self.sim: list[tuple[float, float, float, float, float]] = []  # (t, busy slot-s, requests, prompt, completion)
        self.cpu: list[tuple[float, dict[str, float]]] = []  # (t, cumulative CPU s by kind since the start)
        self.peak_pss: dict[str, float] = defaultdict(float)
        self.peak_uss: dict[str, float] = defaultdict(float)
        self.peak_pss_total = 0.0
        self._cpu_seen: dict[tuple[int, float], tuple[str, float]] = {}  # (pid, create time) -> (kind, CPU s)
        self._cpu_base: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._procs: dict[int, psutil.Process] = {}
        self._own_cpu_s = 0.0

    def __enter__(self) -> Sampler:
        stats = sim_stats(self.sim_name, self.replicas)
        self.slots = sum(int(s["slots"]) for s in stats)
        self.t0 = time.monotonic()
        self._sample_sim()
        machine = psutil.cpu_times()
        self._machine0 = machine.user + machine.nice + machine.system
        self._sample_procs(memory=False, base=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_sim()
        self._sample_procs(memory=False)
        capacity = sum(s["capacity_tokens_per_s"] for s in sim_stats(self.sim_name, self.replicas))
        self.capacity_tokens_per_s = capacity if math.isfinite(capacity) else None  # an instant simulator has none

    def _loop(self) -> None:
        tick = 0
        while not self._stop.wait(_TICK_S):
            tick += 1
            self._sample_sim()
            if tick % 2 == 0:
                self._sample_procs(memory=tick % 4 == 0)
            self._own_cpu_s = time.thread_time()  # the sampling's own CPU, kept out of bench_process

    def _sample_sim(self) -> None:
        stats = sim_stats(self.sim_name, self.replicas)
        self.sim.append(
            (
                time.monotonic(),
                sum(s["busy_slot_s"] for s in stats),
                sum(s["requests"] for s in stats),
                sum(s["prompt_tokens"] for s in stats),
                sum(s["completion_tokens"] for s in stats),
            )
        )

    def _process(self, pid: int) -> psutil.Process:
        proc = self._procs.get(pid)
        if proc is None or not proc.is_running():
            proc = self._procs[pid] = psutil.Process(pid)
        return proc

    def _sample_procs(self, memory: bool, base: bool = False) -> None:
        me = os.getpid()
        try:
            procs = [self._process(me), *self._process(me).children(recursive=True)]
        except _GONE:
            return
        pss: dict[str, float] = defaultdict(float)
        for proc in procs:
            try:
                kind = process_kind(proc, me)
                times = proc.cpu_times()
                key = (proc.pid, proc.create_time())
                if base:
                    self._cpu_base[key] = times.user + times.system
                self._cpu_seen[key] = (kind, times.user + times.system - self._cpu_base.get(key, 0.0))
                if memory:
                    info = proc.memory_full_info()
                    pss[kind] += getattr(info, "pss", info.uss) / _MB
                    self.peak_uss[kind] = max(self.peak_uss[kind], info.uss / _MB)
            except _GONE:
                continue
        by_kind: dict[str, float] = defaultdict(float)
        for kind, seconds in self._cpu_seen.values():  # processes that ended keep their last figure
            by_kind[kind] += seconds
        by_kind["bench_process"] -= self._own_cpu_s
        by_kind["sampler"] = self._own_cpu_s
        machine = psutil.cpu_times()
        by_kind["machine"] = machine.user + machine.nice + machine.system - self._machine0
        self.cpu.append((time.monotonic(), dict(by_kind)))
        for kind, mb in pss.items():
            self.peak_pss[kind] = max(self.peak_pss[kind], mb)
        self.peak_pss_total = max(self.peak_pss_total, sum(pss.values()))

    # -- figures ---------------------------------------------------------------------------------
    def _seconds(self) -> list[tuple[float, float, float, float, float]]:
        """The simulator samples about one second apart (the per-second trace)."""
        out = [self.sim[0]]
        for sample in self.sim[1:]:
            if sample[0] - out[-1][0] >= 1.0 - _TICK_S / 2:
                out.append(sample)
        if out[-1] is not self.sim[-1]:
            out.append(self.sim[-1])
        return out

    def steady_window(self) -> tuple[float, float]:
        """(start, end) of the steady state: from the second by which 10 % of the run's completion
        tokens had come to the one by which 1 - `in_flight_share` (at most 80 %) had, so the start-up
        ramp and the drain (fewer rows left than in flight, then the last long answers) are left out."""
        c0, c1 = self.sim[0][4], self.sim[-1][4]
        lo, hi = (c0 + share * (c1 - c0) for share in self.steady_share)
        start = next((t for t, *_, c in self.sim if c >= lo), self.sim[-1][0])
        end = next((t for t, *_, c in self.sim if c >= hi), self.sim[-1][0])
        return start, max(end, start)

    def utilization(self) -> dict[str, Any]:
        """Busy slot-time over capacity: whole run, after the first row's request, the steady state
        (the median second), and start-up (the time to the first row's request)."""
        t0, b0, r0, p0, c0 = self.sim[0]
        t1, b1, r1, p1, c1 = self.sim[-1]
        calls = max(r1 - r0, 1)
        first = next((t for t, _, r, *_ in self.sim if r >= r0 + self.probes + 1), t1)
        per_second = [(a[0], b[0], (b[1] - a[1]) / (self.slots * (b[0] - a[0]))) for a, b in pairwise(self._seconds())]
        rates = [r for _, _, r in per_second]
        start, end = self.steady_window()
        inside = [r for ta, tb, r in per_second if ta >= start and tb <= end]
        steady = inside or [r for ta, tb, r in per_second if tb > start and ta < end]  # a window under 2 s
        busy_after = next(b for t, b, *_ in self.sim if t >= first)
        return {
            "backend_utilization": round((b1 - b0) / (self.slots * (t1 - t0)), 3),
            "startup_s": round(first - t0, 2),
            "backend_utilization_after_startup": round((b1 - busy_after) / (self.slots * (t1 - first)), 3)
            if t1 > first
            else 0.0,
            "backend_utilization_median_s": round(statistics.median(steady), 3) if steady else 0.0,
            "steady_s": round(end - start, 1),
            "prompt_tokens_per_s": round((p1 - p0) / (t1 - t0), 1),
            "completion_tokens_per_s": round((c1 - c0) / (t1 - t0), 1),
            "prompt_tokens_per_call": round((p1 - p0) / calls, 1),
            "completion_tokens_per_call": round((c1 - c0) / calls, 1),
            "utilization_trace": [round(r, 3) for r in rates],
        }

    def calls_per_s(self) -> float:
        """LLM calls a second the backend answered in the steady state."""
        start, end = self.steady_window()
        (ta, ra), (tb, rb) = (next((t, r) for t, _, r, *_ in self.sim if t >= x) for x in (start, end))
        return round((rb - ra) / (tb - ta), 1) if tb > ta else 0.0

    def _cpu_window(self) -> tuple[float, float, dict[str, float], dict[str, float]]:
        """(calls, seconds, CPU s by kind at the start, at the end) of the steady state, on the CPU
        samples' own times."""
        start, end = self.steady_window()
        (ta, a), (tb, b) = (next(((t, cpu) for t, cpu in self.cpu if t >= x), self.cpu[-1]) for x in (start, end))
        return max(self._requests_at(tb) - self._requests_at(ta), 1), max(tb - ta, 1e-9), a, b

    def _requests_at(self, t: float) -> float:
        """The simulator's request count at `t`, interpolated between its samples."""
        for (t0, _, r0, *_), (t1, _, r1, *_) in pairwise(self.sim):
            if t0 <= t <= t1:
                return r0 + (r1 - r0) * (t - t0) / (t1 - t0) if t1 > t0 else r1
        return self.sim[-1][2]

    def cpu_ms_per_call(self) -> dict[str, float]:
        """CPU milliseconds per LLM call by process kind over the steady state; `machine` is every
        process on the machine, ours and others' (this machine is shared)."""
        calls, _, a, b = self._cpu_window()
        kinds = sorted(set(a) | set(b))
        return {k: round(1000 * (b.get(k, 0.0) - a.get(k, 0.0)) / calls, 3) for k in kinds}

    def our_cores(self) -> float:
        """Cores our processes used in the steady state: above the machine's, the window was too
        short for the CPU samples (0.5 s apart) to measure it, and the run is dropped."""
        _, seconds, a, b = self._cpu_window()
        return round(sum(b.get(k, 0.0) - a.get(k, 0.0) for k in b if k not in ("machine", "sampler")) / seconds, 2)

    def foreign_cores(self) -> float:
        """Cores used by processes that are not ours (other engineers' tests) in the steady state."""
        _, seconds, a, b = self._cpu_window()
        ours = sum(b.get(k, 0.0) - a.get(k, 0.0) for k in b if k not in ("machine", "sampler"))
        return round(max(0.0, (b["machine"] - a["machine"] - ours) / seconds), 2)

    def memory(self) -> dict[str, Any]:
        """Peak summed PSS (all our processes, and by kind) and the largest single-process USS by kind."""
        return {
            "peak_pss_mb": round(self.peak_pss_total, 1),
            "peak_pss_mb_by_kind": {k: round(v, 1) for k, v in sorted(self.peak_pss.items())},
            "peak_uss_mb_by_kind": {k: round(v, 1) for k, v in sorted(self.peak_uss.items())},
        }
