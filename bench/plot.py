"""The benchmark's figure: runner comparison, utilization over time, and the p2p sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COLORS = {"p2p": "#1a56db", "ray_data": "#e3a008", "central": "#9aa5b1"}


def _runs(results: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [r for r in results["runs"] if r["runner"].startswith(prefix)]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    compare, trace, in_flight, partitions = axes.flat

    groups = [w for w in ("natural_reasoning", "coral") if _runs(results, f"{w}/")]
    width = 0.25
    for i, runner in enumerate(_COLORS):
        values = [next((r["tokens_per_s"] for r in _runs(results, f"{w}/{runner}")), 0) for w in groups]
        compare.bar(
            [g + (i - 1) * width for g in range(len(groups))], values, width, label=runner, color=_COLORS[runner]
        )
    compare.set_xticks(range(len(groups)), groups)
    compare.set_ylabel("tokens/s")
    compare.set_title(f"same simulator, same rows, {results['concurrency']} in flight")
    compare.legend()

    for runner in _COLORS:
        for run in _runs(results, f"natural_reasoning/{runner}"):
            trace.plot(run["utilization_trace"], label=runner, color=_COLORS[runner])
    trace.set_ylim(0, 1.1)
    trace.set_xlabel("seconds")
    trace.set_ylabel("backend busy share")
    trace.set_title("natural_reasoning: backend utilization over the run")
    trace.legend()

    sweep = _runs(results, "in_flight/")
    if sweep:
        xs = [r["rows_in_flight"] for r in sweep]
        in_flight.plot(xs, [r["tokens_per_s"] for r in sweep], marker="o", color=_COLORS["p2p"])
        in_flight.set_xscale("log")
        in_flight.set_xlabel("rows in flight (p2p)")
        in_flight.set_ylabel("tokens/s")
        rss = in_flight.twinx()
        rss.plot(xs, [r["peak_rss_mb"] / 1000 for r in sweep], marker="s", color="#c81e1e", linestyle="--")
        rss.set_ylabel("peak RSS, GB (dashed)")
        in_flight.set_title("p2p: rows in flight")

    parts = _runs(results, "partitions/")
    if parts:
        partitions.plot([r["partitions"] for r in parts], [r["tokens_per_s"] for r in parts], marker="o")
        partitions.set_xscale("log", base=2)
        partitions.set_xlabel("partition drivers (p2p, same total in flight)")
        partitions.set_ylabel("tokens/s")
        partitions.set_title("p2p: partitions")
    else:
        partitions.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
