"""Peer-to-peer vs Ray Data batches vs a central controller, on one simulator, in one run.

    python bench/run.py [--quick] [--out FILE] [--skip-embedded]

Sections (the quick run does the first and one in-flight point):
  compare      natural_reasoning- and coral-shaped workloads through all three runners: same rows,
               same simulator, same concurrency; quality figures of p2p and central side by side
  in_flight    p2p with 100 to 10,000 rows in flight (RSS reported)
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
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import runners, workload  # noqa: E402
from bench.plot import plot  # noqa: E402
from bench.sampling import Sampler  # noqa: E402
from bench.workload import CORAL, NATURAL_REASONING, Workload  # noqa: E402
from matrix_provider.llm.backends import client_config, deploy  # noqa: E402
from matrix_provider.llm.sim_server import deploy_sim  # noqa: E402
from matrix_provider.runtime.job import backend_app_suffix  # noqa: E402
from matrix_provider.runtime.spec import compose  # noqa: E402

RESULTS = ROOT / "bench" / "results"
QUICK = {
    "rows": 1000,
    "concurrency": 256,
    "slots": 128,
    "decode": 0.02,
    "in_flight": [2000],
    "coral_rows": 0,
    "sweep_rows": 1000,
}
FULL = {
    "rows": 2500,
    "concurrency": 256,
    "slots": 128,
    "decode": 0.02,
    "in_flight": [100, 1000, 10000],
    "coral_rows": 250,
    "sweep_rows": 1200,
}


class Bench:
    """One simulator, one scratch directory, the figures collected so far."""

    def __init__(self, size: dict[str, Any]):
        self.size = size
        self.work = Path(tempfile.mkdtemp(prefix="matrix-bench-"))
        self.results: dict[str, Any] = {"rows": size["rows"], "concurrency": size["concurrency"], "runs": []}
        self._corpora: dict[int, Path] = {}

    def corpus(self, rows: int) -> Path:
        if rows not in self._corpora:
            self._corpora[rows] = workload.write_corpus(self.work / f"in-{rows}", rows)
        return self._corpora[rows]

    def backend(
        self, wl: Workload, replicas: int = 1, output_mean: int = 48, decode: float | None = None
    ) -> tuple[list[str], Any, str]:
        """(overrides, client config, simulator name) for the workload on this run's simulator
        (`decode` seconds per token instead of the run's, if given)."""
        decode = self.size["decode"] if decode is None else decode
        sim = workload.sim_spec(self.size["slots"], decode, replicas, output_mean)
        overrides = workload.overrides(sim, wl)
        spec = compose(wl.spec, overrides, {"input": "-", "output": "-"})
        name = f"matrix-sim-{backend_app_suffix(spec)}"
        return overrides, client_config(spec.llm, deploy_sim(spec.llm, name)), name

    def measure(
        self, label: str, sim: str, replicas: int, fn: Callable[[], tuple[runners.Rows, float]]
    ) -> dict[str, Any]:
        with Sampler(sim, replicas) as sampler:
            rows, wall = fn()
        latencies = sorted(r[1] for r in rows.values())
        tokens = sum(r[2] for r in rows.values())
        statuses = Counter(r[0] for r in rows.values())
        fig = {
            "runner": label,
            "rows": len(rows),
            "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "rows_per_s": round(len(rows) / wall, 1),
            **sampler.utilization(),
            "backend_capacity_tokens_per_s": sampler.capacity_tokens_per_s,
            "p50_latency_s": round(statistics.median(latencies), 2) if latencies else None,
            "p99_latency_s": round(latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None,
            "ok": statuses["ok"],
            "filtered": statuses["filtered"],
            "error": statuses["error"],
            "peak_rss_mb": round(sampler.peak_mb, 1),
            "peak_rss_mb_by_kind": {k: round(v, 1) for k, v in sorted(sampler.peak_by_kind.items())},
        }
        print(
            f"  {label:<26} {fig['tokens_per_s']:>9,.0f} tok/s  util {fig['backend_utilization']:.2f} "
            f"(median s {fig['backend_utilization_median_s']:.2f}, startup {fig['startup_s']}s)  "
            f"p50 {fig['p50_latency_s']}s  p99 {fig['p99_latency_s']}s  rss {fig['peak_rss_mb']:,.0f} MB",
            flush=True,
        )
        self.results["runs"].append(fig)
        fig["_rows"] = rows
        return fig

    # -- sections ----------------------------------------------------------------------------------
    def compare(self, wl: Workload, rows_n: int, concurrency: int, warm_up: bool = True) -> dict[str, Any]:
        overrides, config, sim = self.backend(wl)
        corpus = self.corpus(rows_n)
        warm = self.corpus(64)
        print(
            f"{wl.name}: {rows_n} rows, {concurrency} in flight"
            + (" (64 rows through each runner first)" if warm_up else "")
        )
        one_each = tuple(f"roles.{r}.replicas=1" for r in set(wl.stages))
        runs = {
            "p2p": lambda c: runners.run_p2p(
                wl, c, self.work / f"out-{wl.name}", overrides, 2, concurrency // 2, one_each
            ),
            "ray_data": lambda c: runners.run_ray_data(wl, c, config, overrides, concurrency),
            "central": lambda c: runners.run_central(wl, c, config, overrides, concurrency),
        }
        figs = {}
        for name, fn in runs.items():
            if warm_up:
                fn(warm)
            figs[name] = self.measure(f"{wl.name}/{name}", sim, 1, lambda fn=fn: fn(corpus))
        return {
            "p2p_over_ray_data": round(figs["p2p"]["tokens_per_s"] / figs["ray_data"]["tokens_per_s"], 2),
            "p2p_over_central": round(figs["p2p"]["tokens_per_s"] / figs["central"]["tokens_per_s"], 2),
            "quality": {name: quality(fig["_rows"]) for name, fig in figs.items()},
            "figures": figs,
        }

    def in_flight(self, values: list[int]) -> int:
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
            )
            fig["rows_in_flight"] = n
        return max(values)

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
        config = deploy(spec.llm)
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


def saturation(runs: list[dict[str, Any]], rows_in_flight: int) -> dict[str, Any]:
    """Backend utilization of the run with the most rows in flight: the issue's 85 % is asked there."""
    run = next(r for r in runs if r.get("rows_in_flight") == rows_in_flight)
    keys = ("backend_utilization", "backend_utilization_after_startup", "backend_utilization_median_s", "startup_s")
    return {"rows_in_flight": rows_in_flight, **{k: run[k] for k in keys}}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the main comparison only, smaller: under 5 minutes")
    parser.add_argument("--out", type=Path, help="write the figures here (default bench/results/<timestamp>.json)")
    parser.add_argument("--skip-embedded", action="store_true", help="leave out the real-model quality run")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    bench = Bench(size)
    res = bench.results
    started = time.monotonic()
    main_cmp = bench.compare(NATURAL_REASONING, size["rows"], size["concurrency"])
    figs = main_cmp.pop("figures")
    res["natural_reasoning"] = main_cmp
    if size["coral_rows"]:
        res["coral"] = bench.compare(CORAL, size["coral_rows"], size["concurrency"], warm_up=False)  # warm by now
        res["coral"].pop("figures")
    res["max_rows_in_flight"] = bench.in_flight(size["in_flight"])
    if not args.quick:
        bench.partitions([1, 4, 16])
        bench.offload(60)
        bench.scaling([1, 2, 4])
        res["hop"] = bench.hop(150)
        print(f"  hop: {res['hop']}")
        if not args.skip_embedded:
            res["embedded_quality"] = bench.embedded(60)
    res.update(
        {
            "p2p_tokens_per_s": figs["p2p"]["tokens_per_s"],
            "ray_data_tokens_per_s": figs["ray_data"]["tokens_per_s"],
            "central_tokens_per_s": figs["central"]["tokens_per_s"],
            "backend_utilization": figs["p2p"]["backend_utilization"],
            "backend_utilization_median_s": figs["p2p"]["backend_utilization_median_s"],
            "backend_capacity_tokens_per_s": figs["p2p"]["backend_capacity_tokens_per_s"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in res["runs"]),
            "saturation": saturation(res["runs"], res["max_rows_in_flight"]),
            "bench_minutes": round((time.monotonic() - started) / 60, 1),
        }
    )
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
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
