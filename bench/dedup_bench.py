"""`matrix dedup` against datatrove's MinHash dedup: quality on planted duplicates, then speed and memory.

    .venv/bin/python bench/dedup_bench.py [--docs 20000] [--partitions 4]

Quality: the planted corpus of bench/dedup_corpus.py, with the band of 0.7 pairs the test leaves
out, scored for both against the truth, their agreement, and the share of pairs caught at each
planted similarity next to LSH's 1-(1-s^8)^14. Speed: `--docs` DCLM-like documents (runs of real
lines, bench/filter_corpus.py; overlapping runs make natural near-duplicates) through both, wall
time and documents per second; for ours also the peak USS of the `matrix dedup` process and of the
largest Ray worker. Uses the cluster at RAY_ADDRESS, else starts a local Ray (its start is counted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import dedup_corpus, filter_corpus  # noqa: E402
from matrix_provider.protocol import parse_manifest  # noqa: E402

MATRIX = Path(sys.executable).parent / "matrix"
_MB = 1 << 20


class PeakUss:
    """Peak USS of a process and, separately, of the largest `ray::` worker, sampled every 0.2 s."""

    def __init__(self, pid: int):
        self.pid, self.own, self.worker = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for proc in psutil.process_iter(["pid", "name", "cmdline"]):
                try:
                    title = " ".join(proc.info["cmdline"] or [])
                    if proc.info["pid"] == self.pid:
                        self.own = max(self.own, proc.memory_full_info().uss)
                    elif title.startswith("ray::") and "IDLE" not in title:
                        self.worker = max(self.worker, proc.memory_full_info().uss)
                except psutil.Error:
                    continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def ours(src: Path, out: Path, partitions: int) -> tuple[dict, set[str], PeakUss]:
    cmd = [str(MATRIX), "dedup", "--input", str(src), "--output", str(out), "--manifest-json"]
    proc = subprocess.Popen([*cmd, "--partitions", str(partitions)], stdout=subprocess.PIPE, text=True)
    peak = PeakUss(proc.pid)
    stdout, _ = proc.communicate()
    peak.stop()
    manifest = parse_manifest(stdout)
    if proc.returncode or manifest is None:
        raise SystemExit(f"matrix dedup failed ({proc.returncode}):\n{stdout[-3000:]}")
    import pyarrow.parquet as pq

    kept = {row["id"] for path in out.glob("part-*.parquet") for row in pq.read_table(path, columns=["id"]).to_pylist()}
    return manifest, kept, peak


def quality(work: Path, partitions: int) -> None:
    corpus = dedup_corpus.build(work / "planted")
    started = time.perf_counter()
    theirs = dedup_corpus.datatrove_kept(corpus, work / "datatrove")
    datatrove_s = time.perf_counter() - started
    manifest, kept, _ = ours(corpus.files[0].parent, work / "ours", partitions)
    print(f"## quality: {corpus.rows} documents, {len(corpus.families)} families")
    print("| | recall J>=0.8 | precision | exact copies removed | wall s |")
    print("|---|---|---|---|---|")
    for name, ids, wall in (("matrix dedup", kept, manifest["wall_seconds"]), ("datatrove", theirs, datatrove_s)):
        s = dedup_corpus.score(corpus, ids)
        print(f"| {name} | {s.recall:.3f} | {s.precision:.3f} | {s.exact_removed}/{s.exact_copies} | {wall:.1f} |")
    agreement = dedup_corpus.agreement(corpus, kept, theirs)
    print(f"\nagreement (families either touches, same number removed): {agreement:.3f}")
    ours_levels = dedup_corpus.score(corpus, kept).caught_by_level
    theirs_levels = dedup_corpus.score(corpus, theirs).caught_by_level
    print("\n| planted J | caught, ours | caught, datatrove | 1-(1-s^8)^14 |\n|---|---|---|---|")
    for level in ours_levels:
        measured = [f.jaccard for f in corpus.families if f.kind == "near" and f.target == level]
        s = sum(measured) / len(measured)
        theory = 1 - (1 - s**8) ** 14
        print(f"| {level} (mean {s:.3f}) | {ours_levels[level]:.2f} | {theirs_levels[level]:.2f} | {theory:.2f} |")


def speed(work: Path, docs: int, partitions: int) -> None:
    src = filter_corpus.write(work / "speed", docs, files=8)
    manifest, kept, peak = ours(src, work / "speed-ours", partitions)
    corpus = dedup_corpus.Corpus(sorted(src.glob("*.jsonl")), [])
    started = time.perf_counter()
    theirs = dedup_corpus.datatrove_kept(corpus, work / "speed-datatrove")
    datatrove_s = time.perf_counter() - started
    print(f"\n## speed: {docs} documents, {partitions} partitions")
    print("| | wall s | docs/s | kept | peak USS MB (process / largest worker) |\n|---|---|---|---|---|")
    wall = manifest["wall_seconds"]
    memory = f"{peak.own / _MB:.0f} / {peak.worker / _MB:.0f}"
    print(f"| matrix dedup | {wall:.1f} | {docs / wall:.0f} | {len(kept)} | {memory} |")
    print(f"| datatrove, 1 worker | {datatrove_s:.1f} | {docs / datatrove_s:.0f} | {len(theirs)} | - |")
    print(f"\nkept by both: {len(kept & theirs)}; manifest: {json.dumps(manifest['dedup'])}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp:
        quality(Path(tmp), args.partitions)
        speed(Path(tmp), args.docs, args.partitions)


if __name__ == "__main__":
    main()
