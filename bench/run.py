"""Peer-to-peer vs a central controller (one process and sharded) vs Ray Data, each at its best.

    python bench/run.py [--quick] [--out FILE] [--skip-embedded] [--sections a,b,...]

Every measured run of compare and controller starts its runner cold in a process of its own
(bench/cold.py), so start-up is counted alike. Sections (the quick run does compare, controller,
hop, model and filter, smaller):
  compare      natural_reasoning through every runner (p2p, central, central sharded over a process
               a core, Ray Data stage by stage with a filter between stages, fused, and ray.data.llm's
               HTTP processor): each runner's rows in flight (and Ray Data's batch size) swept once,
               then 3 runs of every runner at its best configuration in random order (median and
               range): whole-run completion tokens/s (the headline), start-up, steady busy share,
               PSS by process kind; quality figures side by side (coral too in the full run)
  controller   a backend that is never the bottleneck and CPU work in every step: calls/s of
               central, sharded central and p2p (its two roles chained), 3 runs each in random
               order, CPU-ms per call by process kind
  hop          CPU per hop between agent actors and between chained roles (bench/hops.py)
  filter       documents/s through natural_reasoning's admission filters (ours, then datatrove's
               blocks) on DCLM-like real pages: p2p (prefilter, 2 drivers) vs datatrove's executor vs
               the central baseline, the same filter objects on the same documents (bench/filter_bench.py)
  model        the discrete-event model (bench/model.py) checked against the measured points and
               extrapolated to 32 nodes x 8 GPUs
  units        p2p over the same rows in 1, 4 and 16 input files (a driver holds three work units)
  in_flight    p2p with 100 to 4,000 rows in flight (memory reported)
  partitions   p2p with 1 to 16 partition drivers at the same concurrency
  offload      p2p on long coral histories, message offloading on and off
  scaling      p2p over 1, 2 and 4 simulator replicas (capacity and load scaled together)
  latency      extra latency per step of p2p over a plain function call (instant simulator)
  embedded     quality parity of p2p and central on the real model (SmolLM2) and bundled corpus

Prints a table, writes every figure as JSON (bench/results/<timestamp>.json and latest.json, or
--out) and a plot (bench/results/latest.png, or next to --out). Only ratios within one run mean
anything; absolute times on a shared 2-core machine are noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import cold, filter_bench, hops, model, runners, three_nodes, workload  # noqa: E402
from bench.plot import plot  # noqa: E402
from bench.sampling import Sampler  # noqa: E402
from bench.workload import CONTROLLER_BOUND, CORAL, IN_PROCESS_MODEL, NATURAL_REASONING, Workload  # noqa: E402
from matrix_provider.llm.backends import client_config, deploy  # noqa: E402
from matrix_provider.llm.sim_server import deploy_sim  # noqa: E402
from matrix_provider.names import NAMESPACE  # noqa: E402
from matrix_provider.runtime.job import backend_app_suffix, run_backend  # noqa: E402
from matrix_provider.runtime.spec import compose  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNNERS = ("p2p", "central", "sharded_central", "ray_data", "ray_data_fused", "ray_data_llm")
RAY_DATA = ("ray_data", "ray_data_fused", "ray_data_llm")
# The processes a runner brings (bench/sampling.py kinds): Ray's own, the simulator and this one are shared.
OWN_KINDS = ("agents", "drivers", "runner", "central_shard")
PROBES = {"p2p": 1}  # requests a runner sends before its first row's: p2p checks the backend once
DEFAULT_BATCH = 16  # Ray Data's batch size while its rows in flight are swept
BUSY = 0.9  # the steady busy share a runner must keep the backend at
CB_IN_FLIGHT = 128  # rows in flight in the controller-bound section
# p2p agents per role there: a role's one event loop runs its steps' CPU work one at a time, so with
# one replica per role a role waits while the other is backed up; two let the OS balance the cores.
CB_REPLICAS = 2
QUICK = {
    "rows": 200,
    "concurrency": 128,
    "reps": 3,
    "ladder": [128, 256],
    "batches": [16, 64],
    "hop_rows": 2000,
    "model_rows": 120,
    "coral_rows": 0,
    "controller_w_ms": [8.0],
    "controller_rows": 300,
    "in_flight": [],
    "sweep_rows": 300,
    "filter_docs": 8000,
    "filter_reps": 1,
}
FULL = {
    "rows": 600,
    "concurrency": 128,
    "reps": 3,
    "ladder": [64, 128, 256, 512],
    "batches": [8, 16, 32, 64],
    "hop_rows": 6000,
    "model_rows": 400,
    "coral_rows": 150,
    "controller_w_ms": [0.0, 0.5, 1.0, 2.0, 4.0, 8.0],
    "controller_rows": 600,
    "in_flight": [100, 1000, 4000],
    "sweep_rows": 600,
    "filter_docs": 30000,
    "filter_reps": 3,
}
# The backend-bound simulator: the physical model of Llama-3.1-8B on an A100 (llm/sim_gpu.py) with 64
# of its 256 sequence slots, so that the 2 cores here can drive it (~1 s calls, tens of calls/s).
# The controller-bound one: 4,096 slots and ~10 ms calls, never the bottleneck.
BACKEND = {"slots": 64, "decode": 0.0, "output_mean": 64, "model": "vllm-like", "prefill": 0.0}
UNBOUND = {"slots": 4096, "decode": 0.001, "output_mean": 8, "model": "sim", "prefill": 0.0}


class Bench:
    """One scratch directory, the simulator of the section, the figures collected so far."""

    def __init__(self, size: dict[str, Any]):
        self.size = size
        self.work = Path(tempfile.mkdtemp(prefix="matrix-bench-"))
        self.results: dict[str, Any] = {"rows": size["rows"], "concurrency": size["concurrency"], "runs": []}
        self._corpora: dict[tuple[int, Any], Path] = {}
        self._sims: set[tuple[str, int]] = set()

    def corpus(self, rows: int, kb: tuple[float, float] | None = None) -> Path:
        if (rows, kb) not in self._corpora:
            self._corpora[rows, kb] = workload.write_corpus(self.work / f"in-{rows}-{kb}", rows, kb=kb)
        return self._corpora[rows, kb]

    def backend(
        self, wl: Workload, replicas: int = 1, output_mean: int | None = None, decode: float | None = None, **sim: Any
    ) -> tuple[list[str], Any, str]:
        """(overrides, client config, simulator name) for the workload on a simulator (BACKEND unless
        told otherwise); the simulators of earlier sections are stopped, so they are not measured."""
        b = {**BACKEND, **sim}
        if output_mean is not None:
            b["output_mean"] = output_mean
        if decode is not None:  # a fixed time per token: the per-request model
            b.update(decode=decode, model="sim")
        spec_ = workload.sim_spec(
            b["slots"], b["decode"], replicas, b["output_mean"], model=b["model"], prefill_s=b["prefill"]
        )
        overrides = workload.overrides(spec_, wl)
        spec = compose(wl.spec, overrides, {"input": "-", "output": "-"})
        name = f"matrix-sim-{backend_app_suffix(spec)}"
        for old, n in self._sims - {(name, replicas)}:
            for i in range(n):
                ray.kill(ray.get_actor(f"{old}-{i}", namespace=NAMESPACE))
        self._sims = {(name, replicas)}
        return overrides, client_config(spec.llm, deploy_sim(spec.llm, name)), name

    def measure(
        self,
        label: str,
        sim: str,
        replicas: int,
        fn: Callable[[], tuple[runners.Rows, float]],
        in_flight_share: float = 0.2,
        probes: int = 0,
    ) -> dict[str, Any]:
        with Sampler(sim, replicas, in_flight_share, probes) as sampler:
            rows, wall = fn()
        latencies = sorted(r[1] for r in rows.values())
        tokens = sum(r[2] for r in rows.values())
        statuses = Counter(r[0] for r in rows.values())
        memory = sampler.memory()
        fig = {
            "runner": label,
            "rows": len(rows),
            "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "rows_per_s": round(len(rows) / wall, 1),
            **sampler.utilization(),
            "backend_capacity_tokens_per_s": round(sampler.capacity_tokens_per_s or 0, 1) or None,
            "calls_per_s": sampler.calls_per_s(),
            "cpu_ms_per_call": sampler.cpu_ms_per_call(),
            "foreign_cores": sampler.foreign_cores(),
            "our_cores": sampler.our_cores(),
            "p50_latency_s": round(statistics.median(latencies), 2) if latencies else None,
            "p99_latency_s": round(latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None,
            "ok": statuses["ok"],
            "filtered": statuses["filtered"],
            "error": statuses["error"],
            "peak_rss_mb": memory["peak_pss_mb"],  # kept for older readers: summed PSS, not RSS, since issue 13
            **memory,
        }
        fig["valid"] = fig["our_cores"] <= (os.cpu_count() or 1) * 1.05  # else the window was too short
        print(
            f"  {label:<30} {fig['tokens_per_s']:>8,.0f} tok/s ({fig['completion_tokens_per_s']:>6,.0f} completion)"
            f"  util {fig['backend_utilization']:.2f} steady {fig['backend_utilization_median_s']:.2f}"
            f"  start-up {fig['startup_s']}s  {fig['calls_per_s']} calls/s  wall {fig['wall_s']}s"
            f"  others' cores {fig['foreign_cores']}"
            f"  pss {fig['peak_pss_mb']:,.0f} MB",
            flush=True,
        )
        self.results["runs"].append(fig)
        fig["_rows"] = rows
        return fig

    # -- sections ----------------------------------------------------------------------------------
    def cold(self, name: str, **kwargs: Any) -> Callable[[], tuple[runners.Rows, float]]:
        """Runner `run_<name>` of bench/runners.py, started cold in a process of its own."""
        address = ray.get_runtime_context().gcs_address
        return lambda: cold.launch(name, kwargs, self.work, address)

    def runner(
        self, name: str, wl: Workload, n: int, batch: int, overrides: list[str], config: Any
    ) -> Callable[[Path], Callable[[], tuple[runners.Rows, float]]]:
        """Runner `name` at `n` rows in flight (and `batch` rows a batch for Ray Data), as a function of
        the corpus, each run cold: p2p with one partition driver (two from 512 rows in flight) and one
        agent per role (natural_reasoning's three roles are then one chain), the central controller
        in one process, and sharded over a process a core."""
        parts = 2 if n >= 512 else 1
        one_each = tuple(f"roles.{r}.replicas=1" for r in set(wl.stages))
        out = self.work / f"out-{wl.name}-{n}"

        def make(corpus: Path) -> Callable[[], tuple[runners.Rows, float]]:
            common = {"workload": wl, "corpus": corpus, "sim_overrides": overrides}
            if name == "p2p":
                return self.cold("p2p", **common, out=out, partitions=parts, concurrency=n // parts, more=one_each)
            if name == "central":
                return self.cold("central", **common, config=config, concurrency=n)
            if name == "sharded_central":
                return self.cold("central_processes", **common, config=config, concurrency=n)
            return self.cold(name, **common, config=config, concurrency=n, batch_size=batch)

        return make

    def compare(
        self, wl: Workload, rows_n: int, reps: int, at: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Each runner at its best, `reps` runs in a random order (seeded, recorded); figures are
        medians with their range, over the runs whose window was a measurement. The best is found
        in two rounds, each in random order: every runner at each rows in flight of the ladder (Ray
        Data at batch size 16), then Ray Data's other batch sizes at its best rows in flight; the
        most whole-run completion tokens/s wins (`best_config`). The sweep's run at the best is the
        first of the `reps`. With `at` (a `best_config`), no sweep: each runner runs there."""
        overrides, config, sim = self.backend(wl)
        corpus = self.corpus(rows_n)
        sweep: dict[str, dict[str, Any]] = {name: {} for name in RUNNERS}
        runs: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in RUNNERS}
        tried: list[str] = []

        def trial_round(trials: list[tuple[str, int, int]]) -> None:
            random.Random(len(self.results["runs"])).shuffle(trials)
            for name, n, batch in trials:
                key = f"{n}x{batch}"
                fn = self.runner(name, wl, n, batch, overrides, config)(corpus)
                fig = self.measure(f"{wl.name}/sweep/{name}@{key}", sim, 1, fn, n / rows_n, PROBES.get(name, 0))
                fig["rows_in_flight"] = n
                runs[name][key] = fig
                tried.append(f"{name}@{key}")
                sweep[name][key] = {
                    "rows_in_flight": n,
                    "batch_size": batch or None,
                    "completion_tokens_per_s": fig["completion_tokens_per_s"],
                    "steady_utilization": fig["backend_utilization_median_s"],
                    "startup_s": fig["startup_s"],
                    "valid": fig["valid"],
                }

        def best_of(name: str) -> dict[str, Any]:
            return max(sweep[name].values(), key=lambda p: p["completion_tokens_per_s"])

        if at is None:
            print(f"{wl.name}: {rows_n} rows; rows in flight, then Ray Data's batch size, then {reps - 1} more runs")
            trial_round(
                [(name, n, DEFAULT_BATCH if name in RAY_DATA else 0) for name in RUNNERS for n in self.size["ladder"]]
            )
            trial_round(
                [
                    (name, best_of(name)["rows_in_flight"], b)
                    for name in RAY_DATA
                    for b in self.size["batches"]
                    if b != DEFAULT_BATCH and b <= best_of(name)["rows_in_flight"]
                ]
            )
        else:
            trial_round([(name, at[name]["rows_in_flight"], at[name]["batch_size"] or 0) for name in RUNNERS])
        best = {name: best_of(name) for name in RUNNERS}
        figs = {name: [runs[name][f"{b['rows_in_flight']}x{b['batch_size'] or 0}"]] for name, b in best.items()}
        order = [name for name in RUNNERS for _ in range(reps - 1)]
        random.Random(len(self.results["runs"])).shuffle(order)
        for i, name in enumerate(order):
            n, batch = best[name]["rows_in_flight"], best[name]["batch_size"] or 0
            fn = self.runner(name, wl, n, batch, overrides, config)(corpus)
            fig = self.measure(f"{wl.name}/{name}#{i}", sim, 1, fn, n / rows_n, PROBES.get(name, 0))
            fig["rows_in_flight"] = n
            figs[name].append(fig)
        summary = {name: summarize(got) for name, got in figs.items()}
        return {
            "order": tried + order,
            "sweep": sweep,
            "best_config": {k: {key: v[key] for key in ("rows_in_flight", "batch_size")} for k, v in best.items()},
            "p2p_over": {name: ratio(summary, "p2p", name) for name in RUNNERS if name != "p2p"},
            "runners": summary,
            "quality": {name: quality(got[0]["_rows"]) for name, got in figs.items()},
        }

    def units(self, files: list[int], rows_n: int) -> dict[str, float]:
        """p2p at the comparison's rows in flight over the same rows in 1, 4 or 16 files: the steady
        busy share, since a driver holds at most three work units (a file or a split of one), so
        small units cap the rows it keeps in flight."""
        overrides, config, sim = self.backend(NATURAL_REASONING)
        n = self.size["concurrency"]
        out = {}
        for f in files:
            corpus = workload.write_corpus(self.work / f"in-units-{f}", rows_n, files=f)
            fn = self.runner("p2p", NATURAL_REASONING, n, 0, overrides, config)(corpus)
            fig = self.measure(f"units/p2p@{f}-files", sim, 1, fn, n / rows_n, PROBES["p2p"])
            out[str(f)] = fig["backend_utilization_median_s"]
        return out

    def controller(self, w_values: list[float], rows_n: int, reps: int) -> dict[str, Any]:
        """Controller-bound: a backend with 4,096 slots and ~10 ms calls, `w` ms of CPU in each step,
        2-40 KB histories; central in one process, central sharded over a process a core, p2p; 128 rows
        in flight, many more than a step's CPU and a 10 ms call need to keep a core busy; `reps` runs
        of each in a random order, medians over the runs whose window was a measurement."""
        corpus = self.corpus(rows_n, kb=(2.0, 40.0))
        out: dict[str, Any] = {"rows_in_flight": CB_IN_FLIGHT, "by_w": {}}
        names = ("central", "sharded_central", "p2p")
        for w in w_values:
            overrides, config, sim = self.backend(CONTROLLER_BOUND, **UNBOUND)
            overrides = [*overrides, f"params.cpu_ms={w}"]
            order = [name for name in names for _ in range(reps)]
            random.Random(int(10 * w)).shuffle(order)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for i, name in enumerate(order):
                fn = self.controller_runner(name, corpus, self.work / f"out-cb-{w}", overrides, config)
                label = f"controller/{name}@w={w:g}ms#{i}"
                runs[name].append(self.measure(label, sim, 1, fn, CB_IN_FLIGHT / rows_n, PROBES.get(name, 0)))
            out["by_w"][f"{w:g}"] = {name: controller_figures(got) for name, got in runs.items()}
        return out

    def in_process_model(self, rows_n: int, reps: int) -> dict[str, Any]:
        """bench/in_process_model.py (LLM -> in-process embedding model -> LLM) through p2p (the model in
        one actor) and the central controller sharded over a process a core (the model in each), `reps`
        cold runs each in random order: rows/s over the whole run and the peak PSS of the runner's own
        processes (by kind, summed; Ray's own, the simulator and this process left out)."""
        overrides, config, sim = self.backend(IN_PROCESS_MODEL, output_mean=24)
        corpus = self.corpus(rows_n)
        n = 64
        common = {"workload": IN_PROCESS_MODEL, "corpus": corpus, "sim_overrides": overrides}
        make = {
            "p2p": lambda: self.cold("p2p", **common, out=self.work / "out-ipm", partitions=1, concurrency=n),
            "sharded_central": lambda: self.cold("central_processes", **common, config=config, concurrency=n),
        }
        order = [name for name in make for _ in range(reps)]
        random.Random(7).shuffle(order)
        got: dict[str, list[dict[str, Any]]] = {name: [] for name in make}
        for i, name in enumerate(order):
            fig = self.measure(f"in_process_model/{name}#{i}", sim, 1, make[name](), n / rows_n, PROBES.get(name, 0))
            got[name].append(fig)
        out: dict[str, Any] = {"rows": rows_n, "rows_in_flight": n, "order": order}
        for name, figs in got.items():
            rates = [f["rows"] / f["wall_s"] for f in figs]
            pss = [sum(f["peak_pss_mb_by_kind"].get(k, 0.0) for k in OWN_KINDS) for f in figs]
            out[f"{name}_rows_per_s"] = round(statistics.median(rates), 2)
            out[f"{name}_rows_per_s_range"] = [round(min(rates), 2), round(max(rates), 2)]
            out[f"{name}_pss_mb"] = round(statistics.median(pss), 1)
            out[f"{name}_pss_mb_by_kind"] = figs[0]["peak_pss_mb_by_kind"]
        return out

    def controller_runner(
        self, name: str, corpus: Path, out: Path, overrides: list[str], config: Any
    ) -> Callable[[], tuple[runners.Rows, float]]:
        """A controller-bound runner, cold: p2p with 2 drivers and 2 replicas of its one chain (roles a
        and b share a process: a hop between them is a queue put), the central ones in their processes."""
        common = {"workload": CONTROLLER_BOUND, "corpus": corpus, "sim_overrides": overrides}
        if name == "p2p":
            replicas = tuple(f"roles.{r}.replicas={CB_REPLICAS}" for r in ("a", "b"))
            return self.cold("p2p", **common, out=out, partitions=2, concurrency=CB_IN_FLIGHT // 2, more=replicas)
        processes = None if name == "sharded_central" else 1
        return self.cold("central_processes", **common, config=config, concurrency=CB_IN_FLIGHT, processes=processes)

    def in_flight(self, values: list[int]) -> None:
        overrides, _, sim = self.backend(NATURAL_REASONING)
        for n in values:
            rows_n = max(n, self.size["sweep_rows"])
            partitions = 4 if n >= 400 else 1
            fig = self.measure(
                f"in_flight/p2p@{n}",
                sim,
                1,
                lambda n=n, r=rows_n, p=partitions: runners.run_p2p(
                    NATURAL_REASONING, self.corpus(r), self.work / f"out-if-{n}", overrides, p, n // p
                ),
                n / rows_n,
            )
            fig["rows_in_flight"] = n

    def partitions(self, values: list[int]) -> None:
        overrides, _, sim = self.backend(NATURAL_REASONING)
        concurrency = self.size["concurrency"]
        for p in values:
            fig = self.measure(
                f"partitions/p2p@{p}",
                sim,
                1,
                lambda p=p: runners.run_p2p(
                    NATURAL_REASONING,
                    self.corpus(self.size["sweep_rows"]),
                    self.work / f"out-p-{p}",
                    overrides,
                    p,
                    concurrency // p,
                ),
            )
            fig["partitions"] = p

    def offload(self, rows_n: int) -> None:
        overrides, _, sim = self.backend(CORAL, output_mean=200)
        for threshold in (16384, 0):
            self.measure(
                f"offload/coral-long@{'on' if threshold else 'off'}",
                sim,
                1,
                lambda t=threshold: runners.run_p2p(
                    CORAL,
                    self.corpus(rows_n),
                    self.work / f"out-off-{t}",
                    overrides,
                    4,
                    64,
                    (f"orchestrator.offload_bytes={t}",),
                ),
            )

    def scaling(self, replicas: list[int]) -> None:
        for n in replicas:
            overrides, _, sim = self.backend(NATURAL_REASONING, replicas=n)
            concurrency = self.size["concurrency"] * n // 2
            fig = self.measure(
                f"scaling/p2p@{n}-replicas",
                sim,
                n,
                lambda n=n, c=concurrency, o=overrides: runners.run_p2p(
                    NATURAL_REASONING,
                    self.corpus(self.size["sweep_rows"] * n // 2),
                    self.work / f"out-s-{n}",
                    [*o, *(f"roles.{r}.replicas={min(2 * n, 4)}" for r in NATURAL_REASONING.stages)],
                    4,
                    c // 4,
                ),
            )
            fig["sim_replicas"] = n

    def hop_cpu(self, rows_n: int) -> dict[str, Any]:
        """CPU per hop, between agent actors and between chained roles (bench/hops.py)."""
        return hops.measure(rows_n)

    def latency(self, rows_n: int) -> dict[str, Any]:
        """Instant simulator, one row at a time: what p2p adds to each step over a function call."""
        overrides, config, sim = self.backend(NATURAL_REASONING, decode=0.0)
        corpus = self.corpus(rows_n)
        p2p = self.measure(
            "hop/p2p",
            sim,
            1,
            lambda: runners.run_p2p(NATURAL_REASONING, corpus, self.work / "out-hop", overrides, 1, 1),
        )
        central = self.measure(
            "hop/central", sim, 1, lambda: runners.run_central(NATURAL_REASONING, corpus, config, overrides, 1)
        )
        steps = statistics.mean(steps_of(r) for r in p2p["_rows"].values())
        mean = {
            name: statistics.mean(r[1] for r in fig["_rows"].values())
            for name, fig in (("p2p", p2p), ("central", central))
        }
        return {
            "steps_per_row": round(steps, 2),
            "p2p_row_latency_ms": round(1000 * mean["p2p"], 2),
            "central_row_latency_ms": round(1000 * mean["central"], 2),
            "p2p_overhead_per_step_ms": round(1000 * (mean["p2p"] - mean["central"]) / steps, 2),
        }

    def embedded(self, docs: int) -> dict[str, Any]:
        """p2p and central on SmolLM2 (temperature 0) over the first `docs` bundled documents."""
        from matrix_provider.runtime.sources import list_inputs, read_split

        spec = compose("natural_reasoning", [], {"input": "-", "output": "-"})
        fs, files = list_inputs(str(ROOT / "matrix_provider" / "data" / "corpus"), spec.io)
        rows = [{**r.row, "id": r.id} for f in files for r in read_split(fs, f, spec.io) if r.row is not None]
        corpus = self.work / "in-embedded"
        corpus.mkdir(exist_ok=True)
        (corpus / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:docs]))
        config = deploy(run_backend(spec))
        results = {}
        for name, fn in (
            ("p2p", lambda: runners.run_p2p(NATURAL_REASONING, corpus, self.work / "out-emb", [], 2, 8)),
            ("central", lambda: runners.run_central(NATURAL_REASONING, corpus, config, [], 16)),
        ):
            started = time.monotonic()
            rows_out, wall = fn()
            results[name] = {**quality(rows_out), "wall_s": round(wall, 1)}
            print(f"  embedded/{name:<17} {results[name]}  ({time.monotonic() - started:.0f}s)", flush=True)
        return results


def steps_of(result: runners.Result) -> int:
    """LLM steps a natural_reasoning row took (filter, +score, +question), from how it ended."""
    status, _, _, extra = result
    if status == "ok":
        return 3
    return 2 if extra.get("quality_score") is not None else 1


def quality(rows: runners.Rows) -> dict[str, Any]:
    """Per-stage outcome shares: how rows ended, and why the filtered ones stopped."""
    n = len(rows) or 1
    ends: Counter[str] = Counter()
    for status, _, _, extra in rows.values():
        reason = extra.get("reason") or ""
        if status == "filtered":
            stage = reason.split(":")[0].split(" (")[0]
            ends[f"filtered:{stage}"] += 1
        else:
            ends[status] += 1
    out: dict[str, Any] = {k: round(v / n, 4) for k, v in sorted(ends.items())}
    rounds = [extra["rounds"] for _, _, _, extra in rows.values() if extra.get("rounds") is not None]
    if rounds:
        out["mean_rounds"] = round(statistics.mean(rounds), 3)
    return out


def controller_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A controller-bound runner's figures: the median run by calls/s among the runs whose window was
    a measurement (all, if none was), and the range."""
    kept = [f for f in runs if f["valid"]] or runs
    mid = sorted(kept, key=lambda f: f["calls_per_s"])[len(kept) // 2]
    keys = ("calls_per_s", "prompt_tokens_per_call", "completion_tokens_per_call", "cpu_ms_per_call", "our_cores")
    return {
        **{k: mid[k] for k in (*keys, "backend_utilization", "foreign_cores", "startup_s", "error")},
        "calls_per_s_range": [min(f["calls_per_s"] for f in kept), max(f["calls_per_s"] for f in kept)],
        "runs_dropped": sum(not f["valid"] for f in runs),
    }


def summarize(all_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range over the repetitions of one runner whose window was a measurement (all of
    them, if none was)."""
    runs = [r for r in all_runs if r["valid"]] or all_runs
    keys = (
        "tokens_per_s",
        "completion_tokens_per_s",
        "prompt_tokens_per_s",
        "backend_utilization",
        "backend_utilization_median_s",
        "startup_s",
        "p50_latency_s",
        "p99_latency_s",
        "peak_pss_mb",
    )
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in runs]
        out[key] = round(statistics.median(values), 3)
        out[f"{key}_range"] = [min(values), max(values)]
    out["steady_utilization"] = out["backend_utilization_median_s"]
    out["runs_dropped"] = len(all_runs) - len([r for r in all_runs if r["valid"]])
    last = runs[-1]
    for key in ("backend_capacity_tokens_per_s", "prompt_tokens_per_call", "completion_tokens_per_call"):
        out[key] = last[key]
    kinds = {k for r in runs for k in r["cpu_ms_per_call"]}
    out["foreign_cores"] = round(statistics.median(r["foreign_cores"] for r in runs), 2)
    out["cpu_ms_per_call"] = {
        k: round(statistics.median(r["cpu_ms_per_call"].get(k, 0.0) for r in runs), 3) for k in kinds
    }
    out["peak_pss_mb_by_kind"] = max((r["peak_pss_mb_by_kind"] for r in runs), key=lambda m: sum(m.values()))
    return out


def ratio(summary: dict[str, Any], a: str, b: str) -> float:
    """Whole-run completion tokens/s of runner `a` over `b`."""
    return round(summary[a]["completion_tokens_per_s"] / max(summary[b]["completion_tokens_per_s"], 1e-9), 2)


def saturation(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The p2p run with the most rows in flight: the issue's 85 % busy is asked there."""
    run = max((r for r in runs if "p2p" in r["runner"] and "rows_in_flight" in r), key=lambda r: r["rows_in_flight"])
    keys = ("backend_utilization", "backend_utilization_after_startup", "backend_utilization_median_s", "startup_s")
    return {"rows_in_flight": run["rows_in_flight"], "peak_pss_mb": run["peak_pss_mb"], **{k: run[k] for k in keys}}


def print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"matrix-provider benchmark ({res['bench_minutes']} min)")
    for column in ("run", "rows", "tokens/s", "util", "util (median s)", "start-up s", "p50 s", "p99 s", "peak RSS MB"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in res["runs"]:
        table.add_row(
            r["runner"],
            f"{r['rows']:,}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['backend_utilization']:.2f}",
            f"{r['backend_utilization_median_s']:.2f}",
            f"{r['startup_s']:.1f}",
            str(r["p50_latency_s"]),
            str(r["p99_latency_s"]),
            f"{r['peak_rss_mb']:,.0f}",
        )
    Console(width=160).print(table)


SECTIONS = (
    *("compare", "controller", "hop", "in_process_model", "model", "filter"),  # the quick run's
    *("units", "in_flight", "partitions", "offload", "scaling", "latency", "three_nodes"),
)


def start_ray(tries: int = 3) -> None:
    """A local Ray for the benchmark. On a loaded machine Ray's start can give up waiting for its own
    node (its dashboard agent's imports take over 30 s at a load of 20-40): then once more."""
    for attempt in range(1, tries + 1):
        try:
            ray.init(
                address="local",
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
            )
            return
        except Exception as exc:  # Ray raises a bare Exception for a node that timed out starting
            if attempt == tries or "timed out during startup" not in str(exc):
                raise
            print(f"ray.init: {exc}; trying again", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller, the first six sections only: under 8 minutes")
    parser.add_argument("--out", type=Path, help="write the figures here (default bench/results/<timestamp>.json)")
    parser.add_argument("--skip-embedded", action="store_true", help="leave out the real-model quality run")
    parser.add_argument("--sections", help="comma-separated sections to run (default: all of the mode's)")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    chosen = set(args.sections.split(",")) if args.sections else set(SECTIONS[:6] if args.quick else SECTIONS)
    start_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    bench = Bench(size)
    res = bench.results
    started = time.monotonic()
    if "compare" in chosen:
        main_cmp = bench.compare(NATURAL_REASONING, size["rows"], size["reps"])
        res["natural_reasoning"] = main_cmp
        summary = main_cmp["runners"]
        res.update(
            {
                "completion_tokens_per_s": {k: v["completion_tokens_per_s"] for k, v in summary.items()},
                "best_config": main_cmp["best_config"],
                "prompt_tokens_per_s": {k: v["prompt_tokens_per_s"] for k, v in summary.items()},
                "backend_utilization": summary["p2p"]["backend_utilization"],
                "backend_utilization_median_s": summary["p2p"]["backend_utilization_median_s"],
                "backend_capacity_tokens_per_s": summary["p2p"]["backend_capacity_tokens_per_s"],
                "p2p_startup_s": summary["p2p"]["startup_s"],
                "startup_s": {k: v["startup_s"] for k, v in summary.items()},
                "steady_utilization": {k: v["steady_utilization"] for k, v in summary.items()},
            }
        )
        res["rows_in_flight_for_90pct"] = {
            name: min((p["rows_in_flight"] for p in points.values() if p["steady_utilization"] >= BUSY), default=None)
            for name, points in main_cmp["sweep"].items()
        }
        if size["coral_rows"]:
            res["coral"] = bench.compare(CORAL, size["coral_rows"], 1, at=main_cmp["best_config"])
    if "controller" in chosen:
        res["controller"] = bench.controller(size["controller_w_ms"], size["controller_rows"], size["reps"])
        w = max(size["controller_w_ms"])
        at = res["controller"]["by_w"][f"{w:g}"]
        res["controller_bound"] = {"w_ms": w, **{f"{k}_calls_per_s": v["calls_per_s"] for k, v in at.items()}}
    if "in_process_model" in chosen:
        res["in_process_model"] = bench.in_process_model(size["model_rows"], size["reps"])
        print(f"  in_process_model: {json.dumps(res['in_process_model'])}")
    if "filter" in chosen:
        res["filter"] = filter_bench.section(bench.work, size["filter_docs"], size["filter_reps"])
        res["filter_docs_per_s"] = {k: v["docs_per_s"] for k, v in res["filter"]["runners"].items()}
        print(f"  filter: {json.dumps(res['filter_docs_per_s'])} (fixed costs {res['filter']['fixed_s']})")
    if "units" in chosen:
        res["units_steady_utilization"] = bench.units([1, 4, 16], size["rows"])
    if "in_flight" in chosen:
        bench.in_flight(size["in_flight"])
    if "partitions" in chosen:
        bench.partitions([1, 4, 16])
    if "offload" in chosen:
        bench.offload(60)
    if "scaling" in chosen:
        bench.scaling([1, 2, 4])
    if "hop" in chosen:
        res["hops"] = bench.hop_cpu(size["hop_rows"])
        res["hop_cpu_ms"] = res["hops"]["hop_cpu_ms"]
    if "three_nodes" in chosen:
        res["three_nodes"] = three_nodes.measure(bench.work / "three-nodes", size["rows"], size["concurrency"])
        print(f"  three_nodes: {json.dumps(res['three_nodes'])}")
    if "latency" in chosen:
        res["hop"] = bench.latency(150)
        print(f"  latency: {res['hop']}")
    if not args.quick and not args.sections and not args.skip_embedded:
        res["embedded_quality"] = bench.embedded(60)
    p2p_runs = [r for r in res["runs"] if "p2p" in r["runner"] and "rows_in_flight" in r]
    if p2p_runs:
        res["max_rows_in_flight"] = max(r["rows_in_flight"] for r in p2p_runs)
        res["saturation"] = saturation(res["runs"])
    if res["runs"]:
        res["peak_rss_mb"] = res["peak_pss_mb"] = res.get("saturation", {}).get("peak_pss_mb")
    if "model" in chosen:
        res["model"] = model.evaluate(res)
        print(f"  model: {json.dumps(res['model'].get('extrapolation', {}))}")
    res["bench_minutes"] = round((time.monotonic() - started) / 60, 1)
    for run in res["runs"]:
        run.pop("_rows", None)
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"{time.strftime('%Y%m%dT%H%M%S')}.json"
    text = json.dumps(res, indent=2) + "\n"
    out.write_text(text)
    if args.out is None:
        (RESULTS / "latest.json").write_text(text)
    plot(res, out.with_suffix(".png") if args.out else RESULTS / "latest.png")
    print_table(res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("runs", "model")}, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
