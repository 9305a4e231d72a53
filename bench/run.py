"""Peer-to-peer vs a central controller vs Ray Data (stage by stage and fused), on one simulator.

    python bench/run.py [--quick] [--out FILE] [--skip-embedded] [--sections a,b,...]

Sections (the quick run does compare, sweep, controller, model and filter, smaller):
  compare      natural_reasoning through every runner at equal rows in flight, 3 repetitions each in
               random order (median and range): start-up, steady busy share, prompt and completion
               tokens/s, PSS by process kind; quality figures side by side (coral too in the full run)
  sweep        the fewest rows in flight at which each runner keeps the backend 90 % busy
  controller   a backend that is never the bottleneck and CPU work in every step: calls/s of
               central, sharded central and p2p, CPU-ms per call by process kind, the loop's lag
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
  hop          extra latency per step of p2p over a plain function call (instant simulator)
  embedded     quality parity of p2p and central on the real model (SmolLM2) and bundled corpus

Prints a table, writes every figure as JSON (bench/results/<timestamp>.json and latest.json, or
--out) and a plot (bench/results/latest.png, or next to --out). Only ratios within one run mean
anything; absolute times on a shared 2-core machine are noise.
"""

from __future__ import annotations

import argparse
import json
import logging
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

from bench import filter_bench, model, runners, workload  # noqa: E402
from bench.plot import plot  # noqa: E402
from bench.sampling import Sampler  # noqa: E402
from bench.workload import CONTROLLER_BOUND, CORAL, NATURAL_REASONING, Workload  # noqa: E402
from matrix_provider.llm.backends import client_config, deploy  # noqa: E402
from matrix_provider.llm.sim_server import deploy_sim  # noqa: E402
from matrix_provider.runtime.job import backend_app_suffix, run_backend  # noqa: E402
from matrix_provider.runtime.names import NAMESPACE  # noqa: E402
from matrix_provider.runtime.spec import compose  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNNERS = ("p2p", "central", "ray_data", "ray_data_fused")
BUSY = 0.9  # the steady busy share a runner must keep the backend at
CB_IN_FLIGHT = 128  # rows in flight in the controller-bound section
# p2p agents per role there: a role's one event loop runs its steps' CPU work one at a time, so with
# one replica per role a role waits while the other is backed up; two let the OS balance the cores.
CB_REPLICAS = 2
QUICK = {
    "rows": 300,
    "concurrency": 128,
    "reps": 3,
    "ladder": [96, 128, 256, 512],
    "coral_rows": 0,
    "controller_w_ms": [8.0],
    "controller_rows": 400,
    "in_flight": [],
    "sweep_rows": 300,
    "filter_docs": 8000,
    "filter_reps": 1,
}
FULL = {
    "rows": 600,
    "concurrency": 128,
    "reps": 3,
    "ladder": [64, 96, 128, 192, 256, 384, 512, 1024, 2048],
    "coral_rows": 150,
    "controller_w_ms": [0.0, 0.5, 1.0, 2.0, 4.0, 8.0],
    "controller_rows": 600,
    "in_flight": [100, 1000, 4000],
    "sweep_rows": 600,
    "filter_docs": 30000,
    "filter_reps": 3,
}
# The backend-bound simulator: a vLLM-like replica (step time grows with batch and context) with 64
# sequence slots, ~1 s calls, prefill at 5 us a prompt token: ~70 calls/s at full batch, which the 2
# cores here can drive. The controller-bound one: 4,096 slots and ~10 ms calls, never the bottleneck.
BACKEND = {"slots": 64, "decode": 0.0, "output_mean": 64, "model": "vllm-like", "prefill": 5e-6}
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
    ) -> dict[str, Any]:
        with Sampler(sim, replicas, in_flight_share) as sampler:
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
            "p50_latency_s": round(statistics.median(latencies), 2) if latencies else None,
            "p99_latency_s": round(latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None,
            "ok": statuses["ok"],
            "filtered": statuses["filtered"],
            "error": statuses["error"],
            "peak_rss_mb": memory["peak_pss_mb"],  # kept for older readers: summed PSS, not RSS, since issue 13
            **memory,
        }
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
    def runner(self, name: str, wl: Workload, n: int, overrides: list[str], config: Any) -> Callable[[Path], Any]:
        """Runner `name` at `n` rows in flight, as a function of the corpus: p2p with one partition
        driver (two from 512 rows in flight) and one agent per role."""
        parts = 2 if n >= 512 else 1
        one_each = tuple(f"roles.{r}.replicas=1" for r in set(wl.stages))
        out = self.work / f"out-{wl.name}-{n}"
        return {
            "p2p": lambda c: runners.run_p2p(wl, c, out, overrides, parts, n // parts, one_each),
            "central": lambda c: runners.run_central(wl, c, config, overrides, n),
            "ray_data": lambda c: runners.run_ray_data(wl, c, config, overrides, n),
            "ray_data_fused": lambda c: runners.run_ray_data_fused(wl, c, config, overrides, n),
        }[name]

    def compare(self, wl: Workload, rows_n: int, reps: int) -> dict[str, Any]:
        """Every runner at the same rows in flight, `reps` times each in a random order (seeded,
        recorded); figures are medians with their range."""
        n = self.size["concurrency"]
        overrides, config, sim = self.backend(wl)
        corpus = self.corpus(rows_n)
        order = [name for name in RUNNERS for _ in range(reps)]
        random.Random(len(self.results["runs"])).shuffle(order)
        print(f"{wl.name}: {rows_n} rows, {n} in flight, {reps} runs each in the order {order}")
        self.runner("central", wl, 16, overrides, config)(self.corpus(32))  # this process's imports, warm
        figs: dict[str, list[dict[str, Any]]] = {name: [] for name in RUNNERS}
        for i, name in enumerate(order):
            fn = self.runner(name, wl, n, overrides, config)
            fig = self.measure(f"{wl.name}/{name}#{i}", sim, 1, lambda fn=fn: fn(corpus), n / rows_n)
            fig["rows_in_flight"] = n
            figs[name].append(fig)
        summary = {name: summarize(runs) for name, runs in figs.items()}
        return {
            "rows_in_flight": n,
            "order": order,
            "p2p_over_ray_data": ratio(summary, "p2p", "ray_data"),
            "p2p_over_ray_data_fused": ratio(summary, "p2p", "ray_data_fused"),
            "p2p_over_central": ratio(summary, "p2p", "central"),
            "runners": summary,
            "quality": {name: quality(runs[0]["_rows"]) for name, runs in figs.items()},
        }

    def sweep(self, wl: Workload, at: dict[str, Any]) -> dict[str, Any]:
        """The fewest rows in flight on the ladder that keep the backend at least 90 % busy in the
        steady state, per runner: `compare` gave the figure at its rows in flight, so the ladder is
        walked down from there if that reached 90 %, else up until a point does."""
        overrides, config, sim = self.backend(wl)
        n0, ladder = at["rows_in_flight"], self.size["ladder"]
        out: dict[str, Any] = {}
        for name in RUNNERS:
            points = {n0: at["runners"][name]["steady_utilization"]}
            reached = points[n0] >= BUSY
            walk = [n for n in ladder if n < n0] if reached else [n for n in ladder if n > n0]
            for n in walk:
                rows_n = max(self.size["sweep_rows"], 2 * n)
                fn = self.runner(name, wl, n, overrides, config)
                fig = self.measure(f"sweep/{name}@{n}", sim, 1, lambda fn=fn, r=rows_n: fn(self.corpus(r)), n / rows_n)
                fig["rows_in_flight"] = n
                points[n] = fig["backend_utilization_median_s"]
                if (points[n] >= BUSY) == (not reached):
                    break
            busy = sorted(n for n, u in points.items() if u >= BUSY)
            out[name] = {"rows_in_flight_for_90pct": busy[0] if busy else None, "steady_by_rows_in_flight": points}
        return out

    def units(self, files: list[int], rows_n: int) -> dict[str, float]:
        """p2p at the comparison's rows in flight over the same rows in 1, 4 or 16 files: the steady
        busy share, since a driver holds at most three work units (a file or a split of one), so
        small units cap the rows it keeps in flight."""
        overrides, config, sim = self.backend(NATURAL_REASONING)
        n = self.size["concurrency"]
        out = {}
        for f in files:
            corpus = workload.write_corpus(self.work / f"in-units-{f}", rows_n, files=f)
            fn = self.runner("p2p", NATURAL_REASONING, n, overrides, config)
            fig = self.measure(f"units/p2p@{f}-files", sim, 1, lambda fn=fn, c=corpus: fn(c), n / rows_n)
            out[str(f)] = fig["backend_utilization_median_s"]
        return out

    def controller(self, w_values: list[float], rows_n: int) -> dict[str, Any]:
        """Controller-bound: a backend with 4,096 slots and ~10 ms calls, `w` ms of CPU in each step,
        2-40 KB histories; central in one process, central sharded over two, p2p; 128 rows in flight,
        many more than a step's CPU and a 10 ms call need to keep a core busy."""
        corpus = self.corpus(rows_n, kb=(2.0, 40.0))
        out: dict[str, Any] = {"rows_in_flight": CB_IN_FLIGHT, "by_w": {}}
        for w in w_values:
            overrides, config, sim = self.backend(CONTROLLER_BOUND, **UNBOUND)
            overrides = [*overrides, f"params.cpu_ms={w}"]
            figs = {}
            for name in ("central", "sharded_central", "p2p"):
                lags: list[float] = []
                fn = controller_runner(name, corpus, self.work / f"out-cb-{w}", overrides, config, lags)
                fig = self.measure(f"controller/{name}@w={w:g}ms", sim, 1, fn, CB_IN_FLIGHT / rows_n)
                figs[name] = {
                    "calls_per_s": fig["calls_per_s"],
                    "prompt_tokens_per_call": fig["prompt_tokens_per_call"],
                    "completion_tokens_per_call": fig["completion_tokens_per_call"],
                    "cpu_ms_per_call": fig["cpu_ms_per_call"],
                    "backend_utilization": fig["backend_utilization"],
                    "foreign_cores": fig["foreign_cores"],
                    "startup_s": fig["startup_s"],
                    "error": fig["error"],
                }
                if lags:
                    figs[name]["loop_lag_p99_ms"] = round(1000 * sorted(lags)[int(0.99 * (len(lags) - 1))], 1)
            out["by_w"][f"{w:g}"] = figs
        return out

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

    def hop(self, rows_n: int) -> dict[str, Any]:
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


def controller_runner(
    name: str, corpus: Path, out: Path, overrides: list[str], config: Any, lags: list[float]
) -> Callable[[], tuple[runners.Rows, float]]:
    """A controller-bound runner; the central ones put their loop's lags in `lags`."""
    wl = CONTROLLER_BOUND
    if name == "p2p":
        replicas = tuple(f"roles.{r}.replicas={CB_REPLICAS}" for r in ("a", "b"))
        return lambda: runners.run_p2p(wl, corpus, out, overrides, 2, CB_IN_FLIGHT // 2, replicas)
    processes = 2 if name == "sharded_central" else 1
    return lambda: runners.run_central_processes(wl, corpus, config, overrides, CB_IN_FLIGHT, processes, lags)


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


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range over the repetitions of one runner."""
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
    return round(summary[a]["tokens_per_s"] / summary[b]["tokens_per_s"], 2)


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
    *("compare", "sweep", "controller", "model", "filter"),  # the quick run's
    *("units", "in_flight", "partitions", "offload", "scaling", "hop"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller, the first five sections only: under 6 minutes")
    parser.add_argument("--out", type=Path, help="write the figures here (default bench/results/<timestamp>.json)")
    parser.add_argument("--skip-embedded", action="store_true", help="leave out the real-model quality run")
    parser.add_argument("--sections", help="comma-separated sections to run (default: all of the mode's)")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    chosen = set(args.sections.split(",")) if args.sections else set(SECTIONS[:5] if args.quick else SECTIONS)
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
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
                "p2p_tokens_per_s": summary["p2p"]["tokens_per_s"],
                "ray_data_tokens_per_s": summary["ray_data"]["tokens_per_s"],
                "ray_data_fused_tokens_per_s": summary["ray_data_fused"]["tokens_per_s"],
                "central_tokens_per_s": summary["central"]["tokens_per_s"],
                "completion_tokens_per_s": {k: v["completion_tokens_per_s"] for k, v in summary.items()},
                "prompt_tokens_per_s": {k: v["prompt_tokens_per_s"] for k, v in summary.items()},
                "backend_utilization": summary["p2p"]["backend_utilization"],
                "backend_utilization_median_s": summary["p2p"]["backend_utilization_median_s"],
                "backend_capacity_tokens_per_s": summary["p2p"]["backend_capacity_tokens_per_s"],
                "p2p_startup_s": summary["p2p"]["startup_s"],
                "startup_s": {k: v["startup_s"] for k, v in summary.items()},
                "steady_utilization": {k: v["steady_utilization"] for k, v in summary.items()},
            }
        )
        if "sweep" in chosen:
            res["sweep"] = bench.sweep(NATURAL_REASONING, main_cmp)
            res["rows_in_flight_for_90pct"] = {k: v["rows_in_flight_for_90pct"] for k, v in res["sweep"].items()}
        if size["coral_rows"]:
            res["coral"] = bench.compare(CORAL, size["coral_rows"], 1)
    if "controller" in chosen:
        res["controller"] = bench.controller(size["controller_w_ms"], size["controller_rows"])
        w = max(size["controller_w_ms"])
        at = res["controller"]["by_w"][f"{w:g}"]
        res["controller_bound"] = {"w_ms": w, **{f"{k}_calls_per_s": v["calls_per_s"] for k, v in at.items()}}
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
        res["hop"] = bench.hop(150)
        print(f"  hop: {res['hop']}")
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
