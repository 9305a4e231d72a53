"""What a hop costs in CPU: between two agent actors, and between two chained roles of one agent.

    python bench/hops.py [--rows N] [--in-flight N]

A row of the `hops` pipeline visits `params.steps` roles that do nothing, one after the other, so a
run's CPU beyond its fixed costs is hops. Each mode runs the pipeline twice, with 5 steps a row and
with 1, over the same rows and actors (5 roles, 1 replica each: cut into 5 actors, `actor`, or
chained into one, `chained`), and

    hop CPU = (CPU at 5 steps - CPU at 1 step) / (4 x rows),

where CPU is every thread of this process and its descendants (the drivers', agents' and Ray's own
processes, core-worker threads included), less what they burn idle in that time (measured first,
with no rows). Rows, reading, admission and writing cost the same in both runs and cancel; so does
the job's supervision, per second, in the idle part. Per-thread CPU of the agents (from
/proc/<pid>/task) shows where a hop's time goes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa

from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.roles import Role

BENCH = Path(__file__).resolve().parent
ROLES = tuple(f"s{i}" for i in range(5))
_TICK = os.sysconf("SC_CLK_TCK")


class Nothing(Role):
    async def run(self, msg: Orchestrator) -> None:
        return None


class Line(Orchestrator):
    """s0 -> s1 -> ... for `steps` roles (the row's `steps` field), then done."""

    def route(self, done: str | None) -> str | None:
        step = 0 if done is None else ROLES.index(done) + 1
        if step >= int(self.row["steps"]):
            self.finish(OK)
            return None
        return ROLES[step]


PIPELINE = Pipeline(
    name="hops",
    orchestrator=Line,
    roles=dict.fromkeys(ROLES, Nothing),
    columns=pa.schema([]),
    output=lambda msg: {},
)


def process_cpu_s() -> float:
    """CPU seconds of this process and its descendants, every thread."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def agent_threads() -> collections.Counter[str]:
    """CPU seconds of the agents' threads by thread name (Ray's core-worker threads among them)."""
    out: collections.Counter[str] = collections.Counter()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ray::Agent" not in " ".join(proc.cmdline()):
                continue
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                stat = (task / "stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                out[name] += (int(fields[11]) + int(fields[12])) / _TICK
        except (psutil.Error, OSError):
            continue
    return out


def _write(path: Path, rows: int, steps: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with (path / "rows.jsonl").open("w") as out:
        for i in range(rows):
            out.write(json.dumps({"id": f"r{i}", "text": "", "steps": steps}) + "\n")
    return path


def _run(work: Path, steps: int, rows: int, in_flight: int, chained: bool) -> tuple[float, float, collections.Counter]:
    from matrix_provider.runtime import job
    from matrix_provider.runtime.spec import compose

    overrides = ["llm=sim", "io.part_rows=100000"]
    overrides += [f"roles.{r}.max_concurrency={in_flight}" for r in ROLES]
    if not chained:
        overrides += [f"roles.{r}.chain=false" for r in ROLES]
    run = {
        "input": str(_write(work / f"in-{steps}", rows, steps)),
        "output": str(work / f"out-{steps}-{chained}"),
        "concurrency": in_flight,
        "overwrite": True,
    }
    spec = compose(str(BENCH / "hops.yaml"), overrides, run)
    threads0, cpu0, t0 = agent_threads(), process_cpu_s(), time.monotonic()
    manifest = job.run(spec, quiet=True)
    assert manifest["rows_ok"] == rows, manifest
    return process_cpu_s() - cpu0, time.monotonic() - t0, agent_threads() - threads0


def idle_cores(seconds: float = 3.0) -> float:
    """Cores this process and its descendants use with nothing to do (Ray's own processes)."""
    cpu0, t0 = process_cpu_s(), time.monotonic()
    time.sleep(seconds)
    return (process_cpu_s() - cpu0) / (time.monotonic() - t0)


def measure(work: Path, rows: int = 4000, in_flight: int = 256) -> dict[str, Any]:
    """hop CPU in ms for `actor` and `chained`, with the runs' figures."""
    out: dict[str, Any] = {"rows": rows, "rows_in_flight": in_flight, "hop_cpu_ms": {}, "runs": {}}
    for mode in ("actor", "chained"):
        idle = idle_cores()
        runs = {steps: _run(work, steps, rows, in_flight, mode == "chained") for steps in (5, 1)}
        (cpu5, wall5, threads5), (cpu1, wall1, threads1) = runs[5], runs[1]
        hops_cpu = (cpu5 - idle * wall5) - (cpu1 - idle * wall1)
        out["hop_cpu_ms"][mode] = round(1000 * hops_cpu / (4 * rows), 4)
        by_thread = threads5 - threads1
        out["runs"][mode] = {
            "idle_cores": round(idle, 3),
            "cpu_s": {"5": round(cpu5, 2), "1": round(cpu1, 2)},
            "wall_s": {"5": round(wall5, 2), "1": round(wall1, 2)},
            "agent_thread_cpu_ms_per_hop": {
                name: round(1000 * s / (4 * rows), 4) for name, s in by_thread.most_common(6) if s > 0
            },
        }
        print(f"  hop/{mode}: {out['hop_cpu_ms'][mode]} ms CPU a hop ({json.dumps(out['runs'][mode])})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--in-flight", type=int, default=256)
    args = parser.parse_args()
    import ray

    root = str(BENCH.parent)
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        print(json.dumps(measure(Path(tempfile.mkdtemp(prefix="matrix-hops-")), args.rows, args.in_flight), indent=2))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH.parent))
    main()
