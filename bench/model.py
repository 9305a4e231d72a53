"""A discrete-event model of the runtime and both baselines, to see past this 2-core machine.

Three parts, each as simple as the question allows:
- replicas: the simulator's own engine (`matrix_provider.llm.sim_gpu.Scheduler`: step time =
  max(memory, compute), chunked prefill, KV paging with preemption), stepped in simulated time, so
  the model's backend is the benchmark's, rule for rule;
- CPU: single-threaded processes (a controller, an agent, a driver, a Ray Data actor, the simulator)
  sharing a machine's cores (processor sharing; the cores other engineers' processes took during
  the measured run are taken off);
- rows: a closed loop of `rows_in_flight` rows, each a chain of LLM steps (the workload's
  continuation shares), driven the way each runner drives them: central (one process does every
  step's CPU), p2p (an agent per role does the step, the row's driver its share, a hop between
  steps), Ray Data stage by stage (a batch leaves a stage when its slowest row is done) and fused
  (a batch leaves when its slowest conversation is done).

Costs come from the run's own measurements (CPU-ms per LLM call by process kind, prompt and
completion tokens per call); `evaluate` checks the model against the measured 2-core points and
extrapolates to 32 nodes x 8 GPUs.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from matrix_provider.llm.sim_gpu import GPU_MODELS, GpuModel, Scheduler, Seq


class Loop:
    """The event loop: callbacks at simulated times."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._ids = itertools.count()

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._queue, (t, next(self._ids), fn, args))

    def run(self, until: float) -> None:
        while self._queue and self._queue[0][0] <= until:
            self.now, _, fn, args = heapq.heappop(self._queue)
            fn(*args)
        self.now = until


class Cpu:
    """Processes sharing `cores` cores (None: a core each): each process runs its jobs one at a
    time, and the running ones share the cores equally (processor sharing, as a kernel does)."""

    def __init__(self, loop: Loop, cores: float | None):
        self.loop, self.cores = loop, cores
        self.running: dict[Process, list[Any]] = {}  # process -> [work left, then]
        self.settled = 0.0
        self.version = 0

    def _speed(self) -> float:
        return 1.0 if self.cores is None else min(1.0, self.cores / max(1, len(self.running)))

    def start(self, proc: Process) -> None:
        cost, then = proc.jobs.popleft()
        proc.busy_s += cost
        if self.cores is None:  # nothing shared: no bookkeeping
            self.loop.at(self.loop.now + cost, self._finish_one, proc, then)
            return
        self._settle()
        self.running[proc] = [cost, then]
        self._schedule()

    def _settle(self) -> None:
        done = (self.loop.now - self.settled) * self._speed()
        for job in self.running.values():
            job[0] -= done
        self.settled = self.loop.now

    def _schedule(self) -> None:
        self.version += 1
        if self.running:
            left = min(job[0] for job in self.running.values())
            self.loop.at(self.loop.now + max(0.0, left) / self._speed(), self._finish, self.version)

    def _finish(self, version: int) -> None:
        if version != self.version:
            return
        self._settle()
        done = [(proc, job[1]) for proc, job in self.running.items() if job[0] <= 1e-12]
        for proc, _ in done:
            del self.running[proc]
        self._schedule()
        for proc, then in done:
            self._finish_one(proc, then)

    def _finish_one(self, proc: Process, then: Callable[[], None]) -> None:
        proc.running = False
        if proc.jobs:
            proc.running = True
            self.start(proc)
        then()


@dataclass(eq=False)
class Process:
    cpu: Cpu
    jobs: deque[tuple[float, Callable[[], None]]] = field(default_factory=deque)
    running: bool = False
    busy_s: float = 0.0

    def run(self, cost_s: float, then: Callable[[], None]) -> None:
        """Do `cost_s` of CPU work after the jobs before it, then call `then`."""
        if cost_s <= 0:
            then()
            return
        self.jobs.append((cost_s, then))
        if not self.running:
            self.running = True
            self.cpu.start(self)


class Replica:
    """The simulator's engine, one step an event: a step's end is scheduled when it starts."""

    def __init__(self, loop: Loop, gpu: GpuModel, slots: int):
        self.loop = loop
        self.scheduler = Scheduler(gpu, slots)
        self.stepping = False
        self.busy_slot_s = 0.0
        self.completion_tokens = 0
        self.calls = 0

    def submit(self, prompt: int, output: int, then: Callable[[], None]) -> None:
        self.scheduler.add(Seq(prompt, output, ticket=then))
        if not self.stepping:
            self.stepping = True
            self._step()

    def _step(self) -> None:
        seconds, finished = self.scheduler.step()
        if not seconds:
            self.stepping = False
            return
        self.loop.at(self.loop.now + seconds, self._stepped, seconds, finished)

    def _stepped(self, seconds: float, finished: list[Seq]) -> None:
        self.busy_slot_s += seconds * (len(self.scheduler.running) + len(finished))
        for seq in finished:
            self.completion_tokens += seq.output
            self.calls += 1
        self._step()
        for seq in finished:
            seq.ticket()


@dataclass(frozen=True)
class Costs:
    """What one LLM step costs, in seconds, as measured (CPU per call by process kind)."""

    controller_s: float = 0.0  # central: the controller process; p2p: the role's agent; Ray Data: its actor
    driver_s: float = 0.0  # p2p: the row's partition driver
    simulator_s: float = 0.0  # the simulator process (0 for a GPU replica with its own CPU)
    other_s: float = 0.0  # everything else on the machine (Ray's own processes, this one's sampling)
    hop_s: float = 0.0  # p2p: latency between steps that is not CPU (actor call, queue)


@dataclass(frozen=True)
class Shape:
    """A workload: continuation shares per step (natural_reasoning: 1, then 0.5, then 0.5),
    tokens per call (mean prompt; lognormal output with its mean and sigma, capped)."""

    continue_p: tuple[float, ...]
    prompt: int
    output_mean: float
    output_sigma: float = 1.0
    output_max: int = 512

    def steps(self, rng: random.Random) -> int:
        n = 1
        while n < len(self.continue_p) and rng.random() < self.continue_p[n]:
            n += 1
        return n

    def output(self, rng: random.Random) -> int:
        mu = math.log(self.output_mean) - self.output_sigma**2 / 2
        return max(1, min(round(rng.lognormvariate(mu, self.output_sigma)), self.output_max))


@dataclass
class Setup:
    runner: str  # central, sharded_central, p2p, ray_data, ray_data_fused
    rows_in_flight: int
    shape: Shape
    costs: Costs
    nodes: int = 1
    gpus_per_node: int = 1
    slots: int = 64
    cores: float | None = 2.0  # per machine (less what others' processes take); None: a core per process
    batch: int = 16  # Ray Data
    agents_per_role: int = 1  # p2p, per node
    chained: bool = True  # p2p: every role of a row in one agent process (runtime/chains.py)
    replicas: int | None = None  # LLM replicas, if not one a GPU (the 3-node point: one simulator)
    drivers_per_node: int = 1  # p2p partitions
    engine: GpuModel = GPU_MODELS["vllm-like"]
    seed: int = 0


class Model:
    """One setup, simulated for `warm_s` then measured for `measure_s`."""

    def __init__(self, setup: Setup):
        self.s = setup
        self.loop = Loop()
        self.rng = random.Random(setup.seed)
        count = setup.replicas or setup.nodes * setup.gpus_per_node
        self.replicas = [Replica(self.loop, setup.engine, setup.slots) for _ in range(count)]
        # Every node a machine; the controllers and the simulator live on the first one.
        self.cpus = [Cpu(self.loop, setup.cores) for _ in range(setup.nodes)]
        head = self.cpus[0]
        self.simulator = Process(head)
        self.other = Process(head)
        shards = 2 if setup.runner == "sharded_central" else 1
        self.controllers = [Process(head) for _ in range(shards)]
        roles = len(setup.shape.continue_p)
        self.agents = [[Process(cpu) for _ in range(setup.agents_per_role)] for cpu in self.cpus for _ in range(roles)]
        self.drivers = [[Process(cpu) for _ in range(setup.drivers_per_node)] for cpu in self.cpus]
        self.stage_actors = [Process(head) for _ in range(roles)]
        self._turn = itertools.count()

    # -- one LLM step ----------------------------------------------------------------------------
    def _call(self, cpu_proc: Process, then: Callable[[], None], driver: Process | None = None) -> None:
        """CPU of the step on `cpu_proc` (and the driver's share), the simulator's, then the LLM call."""
        c, shape = self.s.costs, self.s.shape
        replica = self.replicas[next(self._turn) % len(self.replicas)]

        def llm() -> None:
            self.other.run(c.other_s, lambda: None)
            self.simulator.run(c.simulator_s, lambda: replica.submit(shape.prompt, shape.output(self.rng), then))

        if driver is not None:
            driver.run(c.driver_s, lambda: cpu_proc.run(c.controller_s, llm))
        else:
            cpu_proc.run(c.controller_s, llm)

    # -- runners ---------------------------------------------------------------------------------
    def _row(self, index: int, done: Callable[[], None]) -> None:
        """One row through all its steps, central or p2p."""
        steps = self.s.shape.steps(self.rng)
        node, local = index % len(self.cpus), index // len(self.cpus)  # rows spread over nodes, then processes
        p2p = self.s.runner == "p2p"

        def step(k: int) -> None:
            if k == steps:
                done()
            elif p2p:
                role = self.agents[node * len(self.s.shape.continue_p) + (0 if self.s.chained else k)]
                agent = role[local % len(role)]
                driver = self.drivers[node][local % len(self.drivers[node])]
                self._call(agent, lambda: self.loop.at(self.loop.now + self.s.costs.hop_s, step, k + 1), driver)
            else:
                self._call(self.controllers[index % len(self.controllers)], lambda: step(k + 1))

        step(0)

    def _rows(self) -> None:
        counter = itertools.count()

        def start() -> None:
            self._row(next(counter), start)

        for _ in range(self.s.rows_in_flight):
            start()

    def _batches(self, fused: bool) -> None:
        """Ray Data: batches of rows; stage by stage, a stage's share of the batches in flight (by
        its traffic) or, fused, all of them on whole conversations; a batch moves on with its slowest row."""
        s = self.s
        traffic = list(itertools.accumulate(s.shape.continue_p, lambda a, b: a * b))
        total = s.rows_in_flight / s.batch
        limits = [max(1, round(total))] if fused else [max(1, round(total * t / sum(traffic))) for t in traffic]
        active = [0] * len(limits)
        queues: list[deque[list[int]]] = [deque() for _ in limits]

        def new_batch() -> list[int]:
            return [s.shape.steps(self.rng) for _ in range(s.batch)]

        def enter(stage: int) -> None:
            while active[stage] < limits[stage] and (queues[stage] or stage == 0):
                rows = queues[stage].popleft() if queues[stage] else new_batch()
                active[stage] += 1
                run(stage, rows)

        def run(stage: int, rows: list[int]) -> None:
            actor = self.stage_actors[0 if fused else stage]
            todo = [n for n in rows if n > stage] if not fused else rows
            pending = [sum(todo) if fused else len(todo)]

            def one_done() -> None:
                pending[0] -= 1
                if pending[0] == 0:
                    leave(stage, rows)

            if pending[0] == 0:
                self.loop.at(self.loop.now, leave, stage, rows)
            for n in todo:
                if fused:
                    chain(actor, n, one_done)
                else:
                    self._call(actor, one_done)

        def chain(actor: Process, n: int, step_done: Callable[[], None]) -> None:
            if n:
                self._call(actor, lambda: (step_done(), chain(actor, n - 1, step_done)))

        def leave(stage: int, rows: list[int]) -> None:
            active[stage] -= 1
            if stage + 1 < len(limits):
                queues[stage + 1].append(rows)
                enter(stage + 1)
            enter(stage)

        enter(0)

    def run(self, warm_s: float = 20.0, measure_s: float = 40.0) -> dict[str, float]:
        if self.s.runner.startswith("ray_data"):
            self._batches(fused=self.s.runner == "ray_data_fused")
        else:
            self._rows()
        self.loop.run(warm_s)
        before = [(r.busy_slot_s, r.completion_tokens, r.calls) for r in self.replicas]
        ctrl = sum(p.busy_s for p in self.controllers)
        self.loop.run(warm_s + measure_s)
        busy = sum(r.busy_slot_s - b for r, (b, _, _) in zip(self.replicas, before, strict=True))
        tokens = sum(r.completion_tokens - t for r, (_, t, _) in zip(self.replicas, before, strict=True))
        calls = sum(r.calls - n for r, (_, _, n) in zip(self.replicas, before, strict=True))
        return {
            "utilization": round(busy / (len(self.replicas) * self.s.slots * measure_s), 3),
            "completion_tokens_per_s": round(tokens / measure_s, 1),
            "calls_per_s": round(calls / measure_s, 1),
            "controller_busy": round((sum(p.busy_s for p in self.controllers) - ctrl) / measure_s, 3),
        }


# -- calibration and extrapolation -------------------------------------------------------------------
_OTHER = ("ray_system", "ray_idle", "bench_process", "runner")  # "sampler" (the benchmark's own sampling) is left out
# The process kind that does a runner's step work (bench/sampling.py); ray_data_llm is not modelled.
_CONTROLLER = {
    "central": "runner",
    "sharded_central": "central_shard",
    "p2p": "agents",
    "ray_data": "ray_data",
    "ray_data_fused": "ray_data",
}
# The controller-bound simulator: a fixed 1 ms a token, never full (4,096 slots).
_UNBOUND = GpuModel(
    weight_bytes=1.0,
    kv_bytes_per_token=0.0,
    hbm_bytes_per_s=1000.0,
    flops_per_token=0.0,
    flops_per_s=1.0,
    step_overhead_s=0.0,
    seq_overhead_s=0.0,
    kv_tokens=1 << 40,
    max_seqs=4096,
    max_batched_tokens=1 << 30,
)


def costs(cpu_ms: dict[str, float], controller: str, hop_s: float = 0.0) -> Costs:
    """Per-call costs from a run's CPU-ms per LLM call by process kind."""
    other = sum(v for k, v in cpu_ms.items() if k in _OTHER and k != controller)
    return Costs(
        controller_s=cpu_ms.get(controller, 0.0) / 1000,
        driver_s=cpu_ms.get("drivers", 0.0) / 1000,
        simulator_s=cpu_ms.get("simulator", 0.0) / 1000,
        other_s=other / 1000,
        hop_s=hop_s,
    )


def shape_of(run: dict[str, Any], continue_p: tuple[float, ...]) -> Shape:
    return Shape(continue_p, round(run["prompt_tokens_per_call"]), max(1.0, run["completion_tokens_per_call"]))


def _error(model: float, measured: float) -> float | None:
    return round(model / measured - 1, 3) if measured else None


def calibrate(results: dict[str, Any], hop_s: float) -> dict[str, Any]:
    """Calibrate on one configuration, predict the others. Each runner's costs (CPU per call by
    process kind, tokens per call) come from its runs at its best configuration; the model then
    predicts the steady busy share at every other configuration of its sweep (rows in flight, batch
    size), which it was not calibrated on. Controller-bound: costs at the largest w, predicted calls/s
    at the others (the step's CPU shifted by the difference in w). error = model / measured - 1."""
    out: dict[str, Any] = {"calibrated_on": {}, "held_out": {}}
    nr = results.get("natural_reasoning")
    for runner, fig in (nr or {}).get("runners", {}).items():
        if runner not in _CONTROLLER:
            continue
        best = nr["best_config"][runner]
        c = costs(fig["cpu_ms_per_call"], _CONTROLLER[runner], hop_s if runner == "p2p" else 0.0)
        for key, point in nr["sweep"][runner].items():
            setup = Setup(
                runner,
                point["rows_in_flight"],
                shape_of(fig, NATURAL_REASONING_P),
                c,
                cores=2.0 - fig["foreign_cores"],
                batch=point["batch_size"] or 16,
            )
            got = Model(setup).run(warm_s=10, measure_s=30)["utilization"]
            same = (point["rows_in_flight"], point["batch_size"]) == (best["rows_in_flight"], best["batch_size"])
            bucket = out["calibrated_on" if same else "held_out"]
            bucket[f"steady_utilization/{runner}@{key}"] = {
                "model": got,
                "measured": point["steady_utilization"],
                "error": _error(got, point["steady_utilization"]),
            }
    cb = results.get("controller")
    if cb:
        w_cal = max(cb["by_w"], key=float)
        for runner, fig in cb["by_w"][w_cal].items():
            kind = "agents" if runner == "p2p" else "central_shard"  # both centrals run in spawned processes there
            c = costs(fig["cpu_ms_per_call"], kind, hop_s if runner == "p2p" else 0.0)
            for w, figs in cb["by_w"].items():
                shifted = replace(c, controller_s=max(0.0, c.controller_s + (float(w) - float(w_cal)) / 1000))
                setup = Setup(
                    runner,
                    cb["rows_in_flight"],
                    shape_of(figs[runner], (1.0,) * 4),
                    shifted,
                    slots=4096,
                    engine=_UNBOUND,
                    cores=2.0 - figs[runner]["foreign_cores"],
                )
                if runner == "p2p":  # two roles, chained: two agents (replicas), two drivers
                    setup.shape = Shape((1.0, 1.0), setup.shape.prompt, setup.shape.output_mean)
                    setup.agents_per_role = setup.drivers_per_node = 2
                got = Model(setup).run(warm_s=3, measure_s=10)["calls_per_s"]
                bucket = out["calibrated_on" if w == w_cal else "held_out"]
                bucket[f"controller_calls_per_s/{runner}@w={w}ms"] = {
                    "model": got,
                    "measured": figs[runner]["calls_per_s"],
                    "error": _error(got, figs[runner]["calls_per_s"]),
                }
    three = results.get("three_nodes")
    if three and nr and "p2p" in nr.get("runners", {}):
        fig = nr["runners"]["p2p"]
        nodes = three["nodes"]
        setup = Setup(
            "p2p",
            three["rows_in_flight"],
            shape_of(fig, NATURAL_REASONING_P),
            costs(fig["cpu_ms_per_call"], "agents", hop_s),
            nodes=nodes,
            replicas=1,
            cores=(2.0 - fig["foreign_cores"]) / nodes,  # the nodes share this machine's cores
        )
        got = Model(setup).run(warm_s=10, measure_s=30)["utilization"]
        out["held_out"][f"steady_utilization/p2p@{nodes}_nodes"] = {
            "model": got,
            "measured": three["backend_utilization_median_s"],
            "error": _error(got, three["backend_utilization_median_s"]),
        }
    errors = [abs(e["error"]) for e in out["held_out"].values() if e["error"] is not None]
    out["max_held_out_error"] = max(errors) if errors else None
    return out


NATURAL_REASONING_P = (1.0, 0.5, 0.5)


def extrapolate(results: dict[str, Any], hop_s: float) -> dict[str, Any]:
    """32 nodes x 8 GPUs of vLLM-like replicas (256 sequences each, as vLLM's default), rows enough to
    fill them (1.5x the slots), enough cores per node: central (one process, the costs measured at
    w = 0 and at the largest w) against p2p (an agent per role and a partition driver per GPU)."""
    nr = results["natural_reasoning"]["runners"]
    shape = shape_of(nr["central"], NATURAL_REASONING_P)
    central_costs = {"w=0": costs(nr["central"]["cpu_ms_per_call"], _CONTROLLER["central"])}
    cb = results.get("controller")
    if cb:
        w = max(cb["by_w"], key=float)
        central_costs[f"w={w}ms"] = costs(cb["by_w"][w]["central"]["cpu_ms_per_call"], _CONTROLLER["sharded_central"])
    # GPU replicas have CPUs of their own, and nothing else on the machine is ours to count: only
    # the controller's, agents' and drivers' CPU is kept.
    central_costs = {k: replace(c, simulator_s=0.0, other_s=0.0) for k, c in central_costs.items()}
    p2p_costs = replace(costs(nr["p2p"]["cpu_ms_per_call"], "agents", hop_s), simulator_s=0.0, other_s=0.0)
    gpus_ladder = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8), (16, 8), (32, 8)]

    def at(runner: str, c: Costs, nodes: int, gpus: int) -> dict[str, float]:
        setup = Setup(runner, round(1.5 * 256 * nodes * gpus), shape, c, nodes, gpus, slots=256, cores=None)
        setup.agents_per_role = setup.drivers_per_node = gpus
        return Model(setup).run(warm_s=5, measure_s=10)

    # P2P has no shared part in the model (each node its driver and agents), so one node is run and
    # scaled; two nodes check that.
    p2p_node = {g: at("p2p", p2p_costs, 1, g) for _, g in gpus_ladder[:4]}
    p2p_two = at("p2p", p2p_costs, 2, 8)
    table: dict[str, Any] = {
        "p2p_linear_check_2_nodes": round(
            p2p_two["completion_tokens_per_s"] / (2 * p2p_node[8]["completion_tokens_per_s"]), 3
        )
    }
    for label, c in central_costs.items():
        rows, saturated = [], None
        for nodes, gpus in gpus_ladder:
            p2p_tps = p2p_node[gpus]["completion_tokens_per_s"] * nodes
            central = at("central", c, nodes, gpus) if saturated is None or nodes * gpus <= 2 * saturated else None
            if central is None:  # past saturation the controller's rate is fixed, spread over more GPUs
                last = rows[-1]
                central = {
                    **last["central"],
                    "utilization": round(last["central"]["utilization"] * last["gpus"] / (nodes * gpus), 3),
                }
            rows.append(
                {
                    "nodes": nodes,
                    "gpus": nodes * gpus,
                    "central": central,
                    "p2p_completion_tokens_per_s": round(p2p_tps, 1),
                }
            )
            if saturated is None and central["controller_busy"] >= 0.95:
                saturated = nodes * gpus
        sat = next((r for r in rows if r["gpus"] == saturated), None)
        table[label] = {
            "controller_cpu_ms_per_call": round(1000 * c.controller_s, 3),
            "saturates_at_gpus": saturated,
            "saturates_at_nodes": None if saturated is None else round(saturated / 8, 3),
            "at_saturation": None
            if sat is None
            else {
                "central_completion_tokens_per_s": sat["central"]["completion_tokens_per_s"],
                "p2p_completion_tokens_per_s": sat["p2p_completion_tokens_per_s"],
            },
            "at_32_nodes": {
                "central_completion_tokens_per_s": rows[-1]["central"]["completion_tokens_per_s"],
                "p2p_completion_tokens_per_s": rows[-1]["p2p_completion_tokens_per_s"],
            },
            "ladder": rows,
        }
    return table


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    """Calibration at the measured points and the 32-node extrapolation, from a run's results."""
    hop = results.get("hop", {}).get("p2p_overhead_per_step_ms")
    # Without the latency section: the outbox's 5 ms linger, which a row's hops between actors wait
    # for company (a hop between chained roles waits for nothing).
    hop_s = (hop if hop is not None else 5.0) / 1000
    out: dict[str, Any] = {"hop_s": hop_s, "calibration": calibrate(results, hop_s)}
    if "natural_reasoning" in results:
        out["extrapolation"] = extrapolate(results, hop_s)
    return out


def main() -> None:
    """`python bench/model.py RESULTS.json`: the model of a results file again (after a change to
    the model, without rerunning the measurements), written back into its `model` key."""
    import json
    import sys
    from pathlib import Path

    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    results["model"] = evaluate(results)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["model"]["calibration"], indent=2))


if __name__ == "__main__":
    main()
