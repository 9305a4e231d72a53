"""State stays bounded as the input grows: ten times the rows cost no more memory.

`make test` runs 40,000 against 400,000 rows (an id set of the whole run would still add ~40 MB, far
above the growth allowed); `make scale` (MATRIX_SCALE_ROWS=100000,1000000) runs
100,000 against a million. Both corpora have the same shape per unit (2 and 20 files of tiny rows),
so the rows per unit and the rows in flight are equal; only the total differs. The pipeline
(tests/pipelines/sampled.py) decides nine rows in ten in the partition drivers' admission check
and sends the tenth through an agent, so drivers, agents and the job all handle many rows. Any
process whose peak USS grows with it keeps per-row state for the whole run (an id set, a list of
committed ids, a manifest counted from every row). A resume with nothing left to do must then
cost about as little as a start: it reads the small per-unit commit records, not the rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, VENV_BIN, RayCluster, read_manifest
from tests.procmem import PeakMemory, raylet_pid
from tests.scale_corpus import write_tiny_corpus

SMALL, BIG = (int(n) for n in os.environ.get("MATRIX_SCALE_ROWS", "40000,400000").split(","))
ROWS_PER_FILE = SMALL // 2
GROWTH = 1.25  # the big run's peak USS of every kind may exceed the small one's by at most this factor
RESUME_LIMIT_S = 10.0


@dataclass
class Measured:
    """One `matrix run`: its outcome, wall time and peak memory."""

    returncode: int
    output: str
    wall_s: float
    mem: PeakMemory
    timed_out: bool = False

    def failure(self) -> str:
        """Why the run did not exit 0, for an assertion message."""
        cause = f"timed out after {self.wall_s:.0f}s" if self.timed_out else f"exit {self.returncode}"
        return f"{cause}: {self.output[-3000:]}"


def _command(src: Path, out: Path) -> list[str]:
    return [
        str(VENV_BIN / "matrix"),
        "run",
        str(REPO / "tests" / "pipelines" / "sampled.yaml"),
        "--input",
        str(src),
        "--output",
        str(out),
        "--partitions",
        "2",
        "--concurrency",
        "512",
        "--manifest-json",
    ]


def _measured_run(
    cluster: RayCluster, src: Path, out: Path, timeout: float, command: list[str] | None = None
) -> Measured:
    """`matrix run` joined to the session's cluster, its job and our actors' workers sampled.

    A run over `timeout` is killed and reported (not raised), so the figures still get printed.
    """
    raylet = raylet_pid(cluster.gcs_address)
    assert raylet is not None, f"no raylet for {cluster.gcs_address}"
    started = time.monotonic()
    proc = subprocess.Popen(
        command or _command(src, out),
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    timed_out = False
    try:
        with PeakMemory(proc.pid, under=raylet) as mem:
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.kill()
                output, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Measured(proc.returncode, output, time.monotonic() - started, mem, timed_out)


def _full_run(cluster: RayCluster, base: Path, rows: int, timeout: float) -> Measured:
    """A fresh corpus of `rows` rows in files of ROWS_PER_FILE, run start to end and checked."""
    src = write_tiny_corpus(base / "in", rows, rows // ROWS_PER_FILE)
    run = _measured_run(cluster, src, base / "out", timeout)
    assert run.returncode == 0, run.failure()
    manifest = read_manifest(str(base / "out"))
    assert (manifest["rows_in"], manifest["rows_out"]) == (rows, rows), manifest
    return run


def _table(small: Measured, big: Measured, resume: Measured) -> str:
    """Per kind: peak USS / PSS (MB) of the small and big runs and of the resume, and the growth."""
    kinds = sorted(set(small.mem.max_by_kind()) | set(big.mem.max_by_kind()))
    figures = {
        name: (run.mem.max_by_kind("uss"), run.mem.max_by_kind("pss"))
        for name, run in (("small", small), ("big", big), ("resume", resume))
    }
    head = f"{SMALL:,} uss/pss", f"{BIG:,} uss/pss", "resume uss/pss", "big/small"
    lines = [f"{'kind':16} {head[0]:>18} {head[1]:>18} {head[2]:>15} {head[3]:>9}"]
    for kind in kinds:
        cells = [f"{uss.get(kind, 0):.0f}/{pss.get(kind, 0):.0f}" for uss, pss in figures.values()]
        ratio = figures["big"][0].get(kind, 0) / max(figures["small"][0].get(kind, 0), 1e-9)
        lines.append(f"{kind:16} {cells[0]:>18} {cells[1]:>18} {cells[2]:>15} {ratio:>8.2f}x")
    lines.append(f"wall: {SMALL:,} {small.wall_s:.1f}s, {BIG:,} {big.wall_s:.1f}s, resume {resume.wall_s:.1f}s")
    others = small.mem.others() | big.mem.others()
    if others:
        lines.append(f"Ray workers not counted: {sorted(others)}")
    return "\n".join(lines)


@pytest.mark.timeout(900)
def test_state_is_bounded_at_ten_times_the_rows(ray_cluster, tmp_path: Path, capsys) -> None:
    small = _full_run(ray_cluster, tmp_path / "small", SMALL, timeout=300)
    big = _full_run(ray_cluster, tmp_path / "big", BIG, timeout=600)
    resume = _measured_run(ray_cluster, tmp_path / "big" / "in", tmp_path / "big" / "out", timeout=60)
    with capsys.disabled():
        print(f"\n[state-scale] peak memory in MB, per kind the largest process\n{_table(small, big, resume)}")

    small_uss, big_uss = small.mem.max_by_kind("uss"), big.mem.max_by_kind("uss")
    assert {"job", "Agent", "PartitionDriver"} <= set(small_uss), f"sampler missed a kind: {small.mem.peaks()}"
    assert set(big_uss) == set(small_uss), f"kinds differ: small {sorted(small_uss)}, big {sorted(big_uss)}"
    grown = {k: (small_uss[k], big_uss[k]) for k in big_uss if big_uss[k] > GROWTH * small_uss[k]}
    assert not grown, f"peak USS (MB, {SMALL:,} -> {BIG:,} rows) grew by more than {GROWTH - 1:.0%}: {grown}"

    assert resume.returncode == 0, resume.failure()
    assert resume.wall_s < RESUME_LIMIT_S, f"resume with nothing to do took {resume.wall_s:.1f}s"
    assert read_manifest(str(tmp_path / "big" / "out"))["rows_resumed"] == BIG


CORAL_ROWS = tuple(int(n) for n in os.environ.get("MATRIX_CORAL_SCALE_ROWS", "100,10000").split(","))


def _coral_questions(path: Path, rows: int) -> Path:
    """`rows` coral questions (the bundled GSM8K ones, repeated under new ids) in one JSONL file."""
    bundled = [json.loads(line) for line in (REPO / "matrix_provider/data/coral/questions.jsonl").open()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for i in range(rows):
            question = bundled[i % len(bundled)]
            out.write(json.dumps({**question, "id": f"q{i}"}) + "\n")
    return path


@pytest.mark.timeout(900)
def test_coral_job_memory_does_not_grow_with_rows(ray_cluster, tmp_path: Path, capsys) -> None:
    """coral's summary is summed per part and per unit, so the job never reads rows back: its peak
    USS at 100 and at 10,000 rows is the same within 25 % (it used to load every row's summary
    columns, even on a resume with nothing to do)."""
    fast = ["llm=sim", "llm.decode_s_per_token=0", "llm.output_tokens_mean=4", "llm.slots=256"]
    fast += ["params.max_turns=2", "--partitions", "2", "--concurrency", "256", "--quiet"]
    peaks, summaries, walls = [], [], []
    for rows in CORAL_ROWS:
        src = _coral_questions(tmp_path / f"in-{rows}" / "q.jsonl", rows)
        out = tmp_path / f"out-{rows}"
        command = [str(VENV_BIN / "matrix"), "run", "coral", "--input", str(src), "--output", str(out), *fast]
        run = _measured_run(ray_cluster, src, out, 600, command)
        assert run.returncode == 0, run.failure()
        manifest = read_manifest(str(out))
        assert manifest["rows_out"] == rows and manifest["summary"]["questions_answered"] == manifest["rows_ok"]
        peaks.append(run.mem.max_by_kind("uss")["job"])
        summaries.append(manifest["summary"])
        walls.append(round(run.wall_s, 1))
    with capsys.disabled():
        print(f"\n[coral-scale] job peak USS (MB) at {CORAL_ROWS} rows: {[round(p) for p in peaks]}, {walls} s")
    assert peaks[1] <= GROWTH * peaks[0], f"job peak USS grew from {peaks[0]:.0f} to {peaks[1]:.0f} MB"
