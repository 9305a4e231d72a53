"""What a hop costs in CPU: between two agent actors, and between two chained roles of one agent.

    python bench/hops.py [--rows N]

Five roles that do nothing (`s0` -> ... -> `s4`), as real agent actors: cut into five actors
(`actor`) or chained into one (`chained`), with a stand-in driver actor that counts the reports.
`rows` messages are put on `s0` at once, so hops coalesce as they would under load, once with 5
steps a row and once with 1, and

    hop CPU = (CPU at 5 steps - CPU at 1 step) / (4 x rows),

where CPU is every thread of the agents' and the driver's processes (Ray's core-worker threads
included) from the first put to the last report, less what the same processes burn idle over as
long (measured on them, alive and idle, just before). A hop so counted includes the step's own
bookkeeping (deadline check, metrics, routing), which chained roles pay too. Per-thread CPU of the
agents (from /proc/<pid>/task) shows where a hop's time goes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import ray

from matrix_provider import names
from matrix_provider.runtime.agents import Agent
from matrix_provider.runtime.chains import plan_chains
from matrix_provider.runtime.orchestrator import OK, Orchestrator
from matrix_provider.runtime.pipeline import Pipeline, load_pipeline
from matrix_provider.runtime.roles import Role
from matrix_provider.runtime.spec import PipelineSpec, compose

BENCH = Path(__file__).resolve().parent
ROLES = tuple(f"s{i}" for i in range(5))
_TICK = os.sysconf("SC_CLK_TCK")
_IDLE_S = 3.0


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


@ray.remote(num_cpus=0)
class Reports:
    """Stands in for the rows' partition driver: counts what agents report."""

    def __init__(self) -> None:
        self.count = 0

    async def reports(self, items: list[Any]) -> None:
        self.count += len(items)

    async def seen(self) -> int:
        return self.count

    def pid(self) -> int:
        return os.getpid()


def _threads(pids: list[int]) -> collections.Counter[str]:
    """CPU seconds by thread name over the processes `pids`, every thread."""
    out: collections.Counter[str] = collections.Counter()
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:  # a thread that just ended
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            out[stat[stat.index("(") + 1 : stat.rindex(")")]] += (int(fields[11]) + int(fields[12])) / _TICK
    return out


def _agent_pids(before: set[int]) -> list[int]:
    """The agent processes started since `before`, among this process's descendants (our local Ray)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid not in before and "ray::Agent" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _spec(chained: bool) -> PipelineSpec:
    overrides = ["llm=sim", *(f"roles.{r}.max_concurrency=4096" for r in ROLES)]
    if not chained:
        overrides += [f"roles.{r}.chain=false" for r in ROLES]
    return compose(str(BENCH / "hops.yaml"), overrides, {"input": "-", "output": "-"})


def _pump(first: Any, sink: Any, spec: PipelineSpec, rows: int, steps: int, start: int) -> None:
    """Put `rows` messages on `s0`, 64 a call, and wait until every one was reported."""
    pipeline = load_pipeline(spec.pipeline)
    wire = []
    for i in range(start, start + rows):
        msg = pipeline.orchestrator(
            id=f"r{i}", partition=0, delivery=1, deadline=time.time() + 3600, row={"steps": steps}, key=f"u/{i}"
        )
        msg.next_role = "s0"
        msg.offload(spec.orchestrator.offload_bytes)
        wire.append(msg.wire())
    target = ray.get(sink.seen.remote()) + rows
    ray.get([first.enqueue_many.remote(wire[k : k + 64]) for k in range(0, rows, 64)])
    while ray.get(sink.seen.remote()) < target:
        time.sleep(0.02)


def measure_mode(chained: bool, rows: int) -> dict[str, Any]:
    """hop CPU of one mode (see the module's docstring) with its figures."""
    spec = _spec(chained)
    run_id = uuid.uuid4().hex[:8]
    env = {"env_vars": {"PYTHONPATH": str(BENCH.parent)}}
    sink = Reports.options(name=names.driver_name(run_id, 0), namespace=names.NAMESPACE).remote()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    chains = plan_chains(spec, load_pipeline(spec.pipeline))
    agents = [
        Agent.options(
            name=names.agent_name(run_id, c.name, 0),
            namespace=names.NAMESPACE,
            runtime_env=env,
            max_concurrency=100_000,
        ).remote(run_id, c.roles, spec.model_dump_json(), None)
        for c in chains
    ]
    try:
        ray.get([a.incarnation.remote() for a in agents], timeout=600)
        pids = [*_agent_pids(before), ray.get(sink.pid.remote())]
        _pump(agents[0], sink, spec, 64, 5, -64)  # warm: imports on the first message's path
        idle0, t0 = _threads(pids), time.monotonic()
        time.sleep(_IDLE_S)
        idle = sum((_threads(pids) - idle0).values()) / (time.monotonic() - t0)
        cpu, wall, threads = {}, {}, {}
        for steps in (5, 1):
            c0, t0 = _threads(pids), time.monotonic()
            _pump(agents[0], sink, spec, rows, steps, steps * rows)
            threads[steps] = _threads(pids) - c0
            wall[steps] = time.monotonic() - t0
            cpu[steps] = sum(threads[steps].values()) - idle * wall[steps]
        hop = (cpu[5] - cpu[1]) / (4 * rows)
        by_thread = threads[5] - threads[1]
        return {
            "hop_cpu_ms": round(1000 * hop, 4),
            "processes": len(pids),
            "idle_cores": round(idle, 4),
            "cpu_s": {str(k): round(v, 3) for k, v in cpu.items()},
            "wall_s": {str(k): round(v, 2) for k, v in wall.items()},
            "thread_cpu_ms_per_hop": {k: round(1000 * v / (4 * rows), 4) for k, v in by_thread.most_common(5) if v > 0},
        }
    finally:
        for actor in (*agents, sink):
            ray.kill(actor)


def measure(rows: int = 4000) -> dict[str, Any]:
    """`hop_cpu_ms` {"actor", "chained"} and each mode's figures."""
    out: dict[str, Any] = {"rows": rows, "hop_cpu_ms": {}, "modes": {}}
    for mode in ("actor", "chained"):
        fig = measure_mode(mode == "chained", rows)
        out["hop_cpu_ms"][mode] = fig["hop_cpu_ms"]
        out["modes"][mode] = fig
        print(f"  hop/{mode}: {fig['hop_cpu_ms']} ms CPU a hop {json.dumps(fig)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(BENCH.parent)}})
    try:
        print(json.dumps(measure(args.rows), indent=2))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH.parent))
    main()
