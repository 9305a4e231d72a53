"""Peer-to-peer vs Ray Data batches vs a central controller, on one simulator, in one run.

    python bench/run.py [--quick] [--out FILE]

The main comparison: the same rows, the same simulator replicas, the same total concurrency
through each runner. Then a sweep of rows in flight (up to 10,000) for the peer-to-peer runtime.
Prints a table, writes the figures as JSON (bench/results/<timestamp>.json and latest.json, or
--out) and a plot (bench/results/latest.png). Absolute numbers depend on the machine; the ratios
between runners in one run are the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import runners, workload
from matrix_provider.llm.backends import client_config
from matrix_provider.llm.sim_server import deploy_sim, sim_stats
from matrix_provider.runtime.job import backend_app_suffix
from matrix_provider.runtime.spec import compose

RESULTS = Path(__file__).resolve().parent / "results"


class RssSampler:
    """Peak summed RSS of this process and every Ray process on the machine."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if proc.pid == psutil.Process().pid or "ray" in (proc.info["name"] or "") or "ray" in cmd:
                    total += proc.info["memory_info"].rss if proc.info["memory_info"] else 0
            self.peak_mb = max(self.peak_mb, total / 1e6)
            self._stop.wait(0.5)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def figures(
    name: str,
    rows: runners.Rows,
    wall: float,
    busy_before: float,
    busy_after: float,
    capacity_slots: int,
    peak_mb: float,
) -> dict[str, Any]:
    latencies = sorted(lat for _, lat, _ in rows.values())
    tokens = sum(t for _, _, t in rows.values())
    statuses = [s for s, _, _ in rows.values()]
    return {
        "runner": name,
        "rows": len(rows),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "rows_per_s": round(len(rows) / wall, 1),
        "backend_utilization": round((busy_after - busy_before) / (capacity_slots * wall), 3),
        "p50_latency_s": round(statistics.median(latencies), 2) if latencies else None,
        "p99_latency_s": round(latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None,
        "ok": statuses.count("ok"),
        "filtered": statuses.count("filtered"),
        "error": statuses.count("error"),
        "peak_rss_mb": round(peak_mb, 1),
    }


def pass_rates(rows: runners.Rows) -> dict[str, float]:
    n = len(rows) or 1
    return {"ok_share": round(sum(s == "ok" for s, _, _ in rows.values()) / n, 4)}


def busy(name: str, replicas: int) -> float:
    return sum(s["busy_slot_s"] for s in sim_stats(name, replicas))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run, under 5 minutes")
    parser.add_argument("--out", type=Path, help="write the figures here (default bench/results/…)")
    args = parser.parse_args()
    rows_n, concurrency, slots, decode = (1500, 256, 128, 0.02) if args.quick else (6000, 1024, 512, 0.05)
    sweep = [256, 2048, 10000] if args.quick else [100, 1000, 4000, 10000]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="matrix-bench-"))
    corpus = workload.write_corpus(work / "in" / "docs.jsonl", rows_n)
    sim = workload.sim_spec(slots, decode)
    overrides = workload.overrides(sim)
    spec = compose("natural_reasoning", overrides, {"input": "-", "output": "-"})
    name = f"matrix-sim-{backend_app_suffix(spec)}"
    config = client_config(spec.llm, deploy_sim(spec.llm, name))
    capacity = slots / decode
    results: dict[str, Any] = {
        "rows": rows_n,
        "concurrency": concurrency,
        "backend_capacity_tokens_per_s": capacity,
        "runs": [],
    }

    def measure(label: str, fn: Any) -> tuple[dict[str, Any], runners.Rows]:
        before = busy(name, sim.replicas)
        with RssSampler() as rss:
            rows, wall = fn()
        fig = figures(label, rows, wall, before, busy(name, sim.replicas), slots * sim.replicas, rss.peak_mb)
        print(
            f"  {label:<12} {fig['tokens_per_s']:>10,.0f} tok/s  util {fig['backend_utilization']:.2f}  "
            f"p50 {fig['p50_latency_s']}s  p99 {fig['p99_latency_s']}s  rss {fig['peak_rss_mb']:,.0f} MB",
            flush=True,
        )
        results["runs"].append(fig)
        return fig, rows

    print(f"workload: {rows_n} rows, {concurrency} in flight, simulator capacity {capacity:,.0f} completion tok/s")
    p2p, p2p_rows = measure("p2p", lambda: runners.run_p2p(corpus, work / "out-p2p", overrides, 4, concurrency // 4))
    data, _ = measure("ray_data", lambda: runners.run_ray_data(corpus, config, overrides, concurrency))
    central, central_rows = measure("central", lambda: runners.run_central(corpus, config, overrides, concurrency))
    max_in_flight = 0
    for in_flight in sweep:
        partitions = 4 if in_flight >= 1000 else 1
        fig, _ = measure(
            f"p2p@{in_flight}",
            lambda f=in_flight, p=partitions: runners.run_p2p(
                corpus if f <= rows_n else workload.write_corpus(work / "in-big" / "docs.jsonl", f),
                work / f"out-{f}",
                overrides,
                p,
                f // p,
            ),
        )
        fig["rows_in_flight"] = in_flight
        max_in_flight = max(max_in_flight, in_flight)
    results.update(
        {
            "p2p_tokens_per_s": p2p["tokens_per_s"],
            "ray_data_tokens_per_s": data["tokens_per_s"],
            "central_tokens_per_s": central["tokens_per_s"],
            "backend_utilization": p2p["backend_utilization"],
            "max_rows_in_flight": max_in_flight,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results["runs"]),
            "p2p_over_ray_data": round(p2p["tokens_per_s"] / data["tokens_per_s"], 2),
            "p2p_over_central": round(p2p["tokens_per_s"] / central["tokens_per_s"], 2),
            "quality": {"p2p": pass_rates(p2p_rows), "central": pass_rates(central_rows)},
        }
    )
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    if args.out is None:
        (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "latest.png")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    ray.shutdown()


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main_runs = [r for r in results["runs"] if "@" not in r["runner"]]
    sweep = [r for r in results["runs"] if "@" in r["runner"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(
        [r["runner"] for r in main_runs],
        [r["tokens_per_s"] for r in main_runs],
        color=["#1a56db", "#9aa5b1", "#9aa5b1"],
    )
    a.set_ylabel("tokens/s")
    a.set_title(f"{results['rows']} rows, {results['concurrency']} in flight, same simulator")
    b.plot([r["rows_in_flight"] for r in sweep], [r["tokens_per_s"] for r in sweep], marker="o")
    b.set_xscale("log")
    b.set_xlabel("rows in flight (p2p)")
    b.set_ylabel("tokens/s")
    b.set_title("peer-to-peer: concurrency sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
