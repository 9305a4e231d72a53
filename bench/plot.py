"""The benchmark's figure: every runner at its best, utilization over time, the rows-in-flight
sweep, the controller-bound calls/s, and the p2p in-flight and partition sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COLORS = {
    "p2p": "#1a56db",
    "central": "#9aa5b1",
    "sharded_central": "#4b5563",
    "ray_data": "#e3a008",
    "ray_data_fused": "#c27803",
    "ray_data_llm": "#8e4b10",
}
_CB_COLORS = {"p2p": "#1a56db", "central": "#9aa5b1", "sharded_central": "#4b5563"}


def _runs(results: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [r for r in results["runs"] if r["runner"].startswith(prefix)]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    compare, trace, sweep, controller, in_flight, partitions = axes.flat

    summary = results.get("natural_reasoning", {}).get("runners", {})
    if summary:
        names = list(summary)
        values = [summary[n]["completion_tokens_per_s"] for n in names]
        low = [v - summary[n]["completion_tokens_per_s_range"][0] for n, v in zip(names, values, strict=True)]
        high = [summary[n]["completion_tokens_per_s_range"][1] - v for n, v in zip(names, values, strict=True)]
        compare.bar(names, values, yerr=[low, high], color=[_COLORS[n] for n in names], capsize=4)
        capacity = next(iter(summary.values()))["backend_capacity_tokens_per_s"]
        if capacity:
            compare.axhline(capacity, color="#c81e1e", linestyle="--", label="backend capacity")
            compare.legend()
        compare.set_ylabel("whole-run completion tokens/s (median, range of 3)")
        compare.set_title("natural_reasoning, every runner at its best configuration")
        compare.tick_params(axis="x", labelrotation=20)
        for name in names:
            run = next(iter(_runs(results, f"natural_reasoning/{name}#")), None)
            if run:
                trace.plot(run["utilization_trace"], label=name, color=_COLORS[name])
        trace.set_ylim(0, 1.1)
        trace.set_xlabel("seconds")
        trace.set_ylabel("backend busy share")
        trace.set_title("one run of each: busy share per second")
        trace.legend()

    swept = results.get("natural_reasoning", {}).get("sweep", {})
    for name, found in swept.items():
        best: dict[int, float] = {}  # by rows in flight, the best batch size's
        for point in found.values():
            n = point["rows_in_flight"]
            best[n] = max(best.get(n, 0.0), point["completion_tokens_per_s"])
        points = sorted(best.items())
        sweep.plot([n for n, _ in points], [u for _, u in points], marker="o", label=name, color=_COLORS[name])
    if swept:
        sweep.set_xscale("log", base=2)
        sweep.set_xlabel("rows in flight")
        sweep.set_ylabel("whole-run completion tokens/s")
        sweep.set_title("the sweep (Ray Data: its best batch size at each)")
        sweep.legend()

    by_w = results.get("controller", {}).get("by_w", {})
    if by_w:
        ws = sorted(by_w, key=float)
        for name, color in _CB_COLORS.items():
            controller.plot(
                [float(w) for w in ws], [by_w[w][name]["calls_per_s"] for w in ws], marker="o", label=name, color=color
            )
        controller.set_xlabel("CPU ms per step (w)")
        controller.set_ylabel("LLM calls/s")
        controller.set_title("controller-bound: backend never the bottleneck")
        controller.legend()
    else:
        controller.axis("off")

    points = [r for r in _runs(results, "in_flight/")]
    if points:
        xs = [r["rows_in_flight"] for r in points]
        in_flight.plot(xs, [r["completion_tokens_per_s"] for r in points], marker="o", color=_COLORS["p2p"])
        in_flight.set_xscale("log")
        in_flight.set_xlabel("rows in flight (p2p)")
        in_flight.set_ylabel("completion tokens/s")
        pss = in_flight.twinx()
        pss.plot(xs, [r["peak_pss_mb"] / 1000 for r in points], marker="s", color="#c81e1e", linestyle="--")
        pss.set_ylabel("peak PSS, GB (dashed)")
        in_flight.set_title("p2p: rows in flight")
    else:
        in_flight.axis("off")

    parts = _runs(results, "partitions/")
    if parts:
        partitions.plot([r["partitions"] for r in parts], [r["completion_tokens_per_s"] for r in parts], marker="o")
        partitions.set_xscale("log", base=2)
        partitions.set_xlabel("partition drivers (p2p, same total in flight)")
        partitions.set_ylabel("completion tokens/s")
        partitions.set_title("p2p: partitions")
    else:
        partitions.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
