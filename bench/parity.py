"""Quality parity: the same rows through our runtime (p2p) and the central asyncio baseline give the
same quality figures, within noise, for each shipped pipeline.

    python bench/parity.py [--sim-rows N] [--embedded-rows M] [--pipelines a,b] [--out FILE]

Two backends:
  sim        the load simulator: answers are a deterministic function of the request, so the
             same conversation gets the same answers on both runners; a difference means the
             runtime routed, retried or cut a row differently (routing parity);
  embedded   SmolLM2-135M through llama.cpp at temperature 0 (real-model parity on a small set).

Every figure is the mean of a per-row value (a 0/1 outcome or a number); "noise" is twice the
standard error of the difference of the two means, and a figure is within noise when the
difference is no larger. Prints a Markdown table (pasted into bench/README.md) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import runners  # noqa: E402
from bench.workload import Workload, write_corpus  # noqa: E402
from matrix_provider.llm.backends import deploy  # noqa: E402
from matrix_provider.pipelines.doc_filters import DATATROVE_BLOCKS  # noqa: E402
from matrix_provider.runtime.job import run_backend  # noqa: E402
from matrix_provider.runtime.spec import compose  # noqa: E402

RowValues = Callable[[dict[str, Any]], dict[str, float | None]]
SIM = ["llm=sim", "llm.slots=64", "llm.decode_s_per_token=0.001", "llm.output_tokens_mean=24"]


def _status(row: dict[str, Any]) -> dict[str, float | None]:
    return {f"share_{s}": float(row["status"] == s) for s in ("ok", "filtered", "error")}


def _natural_reasoning(row: dict[str, Any]) -> dict[str, float | None]:
    reason = row.get("reason") or ""
    return {
        **_status(row),
        "passes_filter": float(not (row["status"] == "filtered" and not reason.startswith("score"))),
        "quality_score": row.get("quality_score"),
    }


def _coral(row: dict[str, Any]) -> dict[str, float | None]:
    done = row["status"] != "error"
    return {
        **_status(row),
        "agreement": float(bool(row.get("agreed"))) if done else None,
        "agreement_correct": float(bool(row.get("correct"))) if done else None,
        "turns": row.get("turns"),
    }


def _tau2(row: dict[str, Any]) -> dict[str, float | None]:
    reward = row.get("reward")
    values: dict[str, float | None] = {**_status(row), "reward": reward}
    if reward is not None:
        values[f"reward_{row.get('domain')}"] = reward
        values["pass^1"] = float(reward >= 1.0)
    calls, errors = row.get("tool_calls"), row.get("tool_errors")
    values["tool_error_rate"] = errors / calls if calls else None
    return values


@dataclass(frozen=True)
class Case:
    """One pipeline: its spec, how to make n input rows for a backend, its per-row figures."""

    spec: str
    inputs: Callable[[Path, str, int], Path]
    values: RowValues
    overrides: tuple[str, ...] = ()
    embedded: tuple[str, ...] = ()  # more overrides on SmolLM2 (a CPU model: short dialogues)
    embedded_rows: int = 1 << 30  # at most this many rows on SmolLM2


def _documents(work: Path, backend: str, n: int) -> Path:
    if backend == "sim":
        return write_corpus(work / "docs-sim", n, files=4)
    from matrix_provider.runtime.sources import list_inputs, read_split

    io = compose("natural_reasoning", [], {"input": "-", "output": "-"}).io
    fs, files = list_inputs(str(ROOT / "matrix_provider" / "data" / "corpus"), io)
    rows = [{**r.row, "id": r.id} for f in files for r in read_split(fs, f, io) if r.row is not None]
    return _jsonl(work / "docs-embedded", rows[:n])


def _questions(work: Path, backend: str, n: int) -> Path:
    path = ROOT / "matrix_provider" / "data" / "coral" / "questions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return _jsonl(work / f"questions-{backend}", rows)


def _tasks(work: Path, backend: str, n: int) -> Path:
    """`n` tasks, half mock and half airline (tau2-bench's own), one trial each."""
    from matrix_provider.pipelines.tau2 import task_rows

    rows = [*task_rows(["mock"], 1, limit=n // 2), *task_rows(["airline"], 1, limit=n - n // 2)]
    return _jsonl(work / f"tasks-{backend}", rows)


def _jsonl(directory: Path, rows: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


CASES: dict[str, Case] = {
    # Admission relaxed so that every document reaches the LLM steps: parity of what the LLM decides.
    "natural_reasoning": Case(
        "natural_reasoning",
        _documents,
        _natural_reasoning,
        (
            "params.min_words=20",
            "params.min_cues_per_1000_words=0",
            *(f"params.{block}.enabled=false" for block in DATATROVE_BLOCKS),
        ),
    ),
    "coral": Case("coral", _questions, _coral, ("params.max_turns=4",)),
    # Airline's policy and tool schemas need SmolLM2's long context: few, short dialogues on the CPU model.
    "tau2": Case(
        "tau2",
        _tasks,
        _tau2,
        ("params.max_steps=12", "llm.n_ctx=8192"),
        ("params.max_steps=4", "roles.user.max_tokens=48", "roles.assistant.max_tokens=96", "llm.n_parallel=2"),
        embedded_rows=4,
    ),
}


def compare(case: Case, backend: str, n: int, work: Path) -> dict[str, Any]:
    """p2p and central over the same `n` rows on `backend`; per figure both means and the noise."""
    overrides = [*(SIM if backend == "sim" else []), *case.overrides, *(case.embedded if backend == "embedded" else [])]
    corpus = case.inputs(work, backend, n if backend == "sim" else min(n, case.embedded_rows))
    spec = compose(case.spec, overrides, {"input": "-", "output": "-"})
    config = deploy(run_backend(spec))
    wl = Workload(case.spec, case.spec, (), ())
    concurrency = 64 if backend == "sim" else 8
    started = time.monotonic()
    p2p, _ = runners.run_p2p(wl, corpus, work / f"out-{case.spec}-{backend}", overrides, 2, concurrency // 2)
    central, _ = runners.run_central(wl, corpus, config, overrides, concurrency)
    assert p2p.keys() == central.keys(), "the runners saw different rows"
    figures = {}
    for name in sorted({k for rows in (p2p, central) for r in rows.values() for k in case.values(_row(r))}):
        a = [v for r in p2p.values() if (v := case.values(_row(r)).get(name)) is not None]
        b = [v for r in central.values() if (v := case.values(_row(r)).get(name)) is not None]
        figures[name] = _figure(a, b)
    return {"rows": len(p2p), "wall_s": round(time.monotonic() - started, 1), "figures": figures}


def _row(result: runners.Result) -> dict[str, Any]:
    status, _, _, extra = result
    return {"status": status, **extra}


def _figure(a: list[float], b: list[float]) -> dict[str, Any]:
    mean_a = statistics.fmean(a) if a else None
    mean_b = statistics.fmean(b) if b else None
    if mean_a is None or mean_b is None:
        return {"p2p": mean_a, "central": mean_b, "noise": None, "within": mean_a == mean_b}
    var = sum(statistics.pvariance(x) / len(x) for x in (a, b))
    noise = 2 * math.sqrt(var)
    diff = abs(mean_a - mean_b)
    return {
        "p2p": round(mean_a, 4),
        "central": round(mean_b, 4),
        "n": [len(a), len(b)],
        "noise": round(noise, 4),
        "within": diff <= noise + 1e-9,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| pipeline | backend | rows | figure | p2p | central | noise (2 SE) | within noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, res in results.items():
        pipeline, backend = key.split("/")
        for name, fig in res["figures"].items():
            within = "yes" if fig["within"] else "**no**"
            lines.append(
                f"| {pipeline} | {backend} | {res['rows']} | {name} | {fig['p2p']} | {fig['central']} | "
                f"{fig['noise']} | {within} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-rows", type=int, default=300)
    parser.add_argument("--embedded-rows", type=int, default=12)
    parser.add_argument("--pipelines", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "parity.json")
    args = parser.parse_args()
    import ray

    ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    results: dict[str, dict[str, Any]] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        for name in args.pipelines.split(","):
            for backend, n in (("sim", args.sim_rows), ("embedded", args.embedded_rows)):
                if n <= 0:
                    continue
                results[f"{name}/{backend}"] = res = compare(CASES[name], backend, n, Path(tmp))
                print(f"{name}/{backend}: {res['rows']} rows in {res['wall_s']}s", flush=True)
                args.out.write_text(json.dumps(results, indent=2) + "\n")  # a cut-short run keeps what it has
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
