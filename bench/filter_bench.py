"""The `filter` section: documents/s through natural_reasoning's admission filters (our reasoning
heuristics, then datatrove's FineWeb, Gopher quality, Gopher repetition and C4 blocks), on the
same DCLM-like documents (bench/filter_corpus.py) and the same filter objects, on both cores:

- p2p: our runtime running `prefilter` (admission only, in 2 partition drivers), from job start to
  committed output (every row written, with its reason);
- datatrove: its `LocalPipelineExecutor`, tasks=2 workers=2, JsonlReader over the same files, the
  chain's filter objects, a JsonlWriter of the kept documents;
- central: one process reading the files, applying the admission check row by row as the central
  baseline does (bench/runners.py `_admit`), writing every row like p2p.

Each runner also runs a 2-document input: that wall is its fixed cost (start-up, commit, teardown),
reported apart; `docs_per_s` is documents over (wall - fixed cost), `end_to_end_docs_per_s` over the
whole wall. datatrove and central run in a subprocess each (`python bench/filter_bench.py RUNNER IN
OUT` prints its wall and kept ids), so no Ray thread of the benchmark process is forked.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import filter_corpus, runners  # noqa: E402
from bench.workload import Workload  # noqa: E402
from matrix_provider.runtime.pipeline import load_pipeline, output_row  # noqa: E402
from matrix_provider.runtime.spec import compose  # noqa: E402

PREFILTER = Workload("prefilter", "prefilter", (), ())
FILES = 4  # >= 2: datatrove's executor gives each task whole files
WORKERS = 2


def _params() -> dict[str, Any]:
    return compose("prefilter", [], {"input": "-", "output": "-"}).params


def _rows(corpus: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(corpus.glob("*.jsonl")) for line in path.read_text().splitlines()]


def central(corpus: Path, out: Path) -> list[str]:
    """One process, the central baseline's admission per row; every row's output written once."""
    spec = compose("prefilter", [], {"input": "-", "output": "-"})
    pipeline = load_pipeline("prefilter")
    table = []
    for row in _rows(corpus):
        msg, _ = runners._admit(pipeline, spec, row)  # prefilter's routing finishes an admitted row at once
        table.append(output_row(pipeline, msg))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table, schema=pipeline.schema), out / "part-0.parquet")
    return [r["id"] for r in table if r["status"] == "ok"]


def datatrove(corpus: Path, out: Path) -> list[str]:
    """datatrove's executor, 2 tasks on 2 workers, over the chain natural_reasoning's drivers run."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from matrix_provider.pipelines.doc_filters import build_chain

    steps = [check.step for check in build_chain(_params())]
    executor = LocalPipelineExecutor(
        pipeline=[JsonlReader(str(corpus)), *steps, JsonlWriter(str(out / "kept"), compression=None)],
        tasks=WORKERS,
        workers=WORKERS,
        logging_dir=str(out / "logs"),
        start_method="fork",  # its fastest start (forkserver, the default, adds 1.5-4 s here)
    )
    executor.run()
    return [json.loads(line)["id"] for path in sorted((out / "kept").glob("*.jsonl")) for line in path.open()]


def _subprocess(runner: str, corpus: Path, out: Path) -> tuple[float, list[str]]:
    proc = subprocess.run(
        [sys.executable, __file__, runner, str(corpus), str(out)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{runner} runner failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["wall_s"], result["kept"]


def _p2p(corpus: Path, out: Path) -> tuple[float, list[str]]:
    rows, wall = runners.run_p2p(PREFILTER, corpus, out, [], WORKERS, 256)
    return wall, [k for k, v in rows.items() if v[0] == "ok"]


RUNNERS = {
    "p2p": _p2p,
    "datatrove": lambda c, o: _subprocess("datatrove", c, o),
    "central": lambda c, o: _subprocess("central", c, o),
}


def section(work: Path, docs: int, reps: int) -> dict[str, Any]:
    """Every runner `reps` times in random order over `docs` documents; medians, ranges, fixed costs."""
    corpus = filter_corpus.write(work / "filter-in", docs, FILES)
    tiny = filter_corpus.write(work / "filter-tiny", 2, 2)
    order = [name for _ in range(reps) for name in RUNNERS]
    random.Random(1).shuffle(order)
    walls: dict[str, list[float]] = {name: [] for name in RUNNERS}
    fixed: dict[str, float] = {}
    kept: dict[str, set[str]] = {}
    for i, name in enumerate(order):
        wall, ids = RUNNERS[name](corpus, work / f"filter-out-{name}-{i}")
        walls[name].append(wall)
        kept[name] = set(ids)
        print(f"  filter {name}: {docs} docs in {wall:.2f}s, {len(ids)} kept")
    for name in RUNNERS:
        fixed[name] = round(RUNNERS[name](tiny, work / f"filter-tiny-{name}")[0], 2)
    if len({frozenset(ids) for ids in kept.values()}) != 1:
        raise RuntimeError(f"runners kept different documents: { {k: len(v) for k, v in kept.items()} }")
    result: dict[str, Any] = {"docs": docs, "kept": len(kept["p2p"]), "reps": reps, "fixed_s": fixed, "runners": {}}
    for name, ws in walls.items():
        wall = statistics.median(ws)
        result["runners"][name] = {
            "wall_s": round(wall, 2),
            "wall_range_s": [round(min(ws), 2), round(max(ws), 2)],
            "docs_per_s": round(docs / max(wall - fixed[name], 1e-3), 1),
            "end_to_end_docs_per_s": round(docs / wall, 1),
        }
    return result


def main() -> None:
    runner, corpus, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    fn = {"central": central, "datatrove": datatrove}[runner]
    started = time.monotonic()
    kept = fn(corpus, out)
    print(json.dumps({"wall_s": time.monotonic() - started, "kept": kept}))


if __name__ == "__main__":
    main()
