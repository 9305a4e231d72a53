"""Resumes at the edges: inside a unit, after the input changed, after a commit record was cut short.

Every test runs `matrix run` against the session's real Ray cluster, on local disk.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import zstandard

from tests.conftest import VENV_BIN, assert_exactly_once, current_epoch, read_manifest, read_output, run_matrix
from tests.corpus import write_jsonl
from tests.output_readers import read_three_ways

SLOW = ["llm=sim", "llm.decode_s_per_token=0.02", "llm.output_tokens_mean=8", "llm.slots=8", "io.part_rows=10"]


def _run(cluster, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_matrix(["run", *args, "--quiet"], cluster.env, timeout=timeout)


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _start(cluster, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(VENV_BIN / "matrix"), "run", *args, "--quiet"],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _rows_in_part_records(out: Path) -> int:
    """Rows that parts of open units hold (their records), as a resume would count them."""
    total = 0
    for path in out.glob("_commits/*/*/*.json"):
        try:
            total += json.loads(path.read_text())["rows"]
        except (ValueError, FileNotFoundError):  # being written or folded away right now
            continue
    return total


def test_a_run_killed_at_ninety_percent_of_one_compressed_file_resumes_inside_it(ray_cluster, tmp_path: Path) -> None:
    """100,000 rows in one .jsonl.zst (one unit: a compressed file is never split). Killed once parts
    hold 90 % of it, the rerun redoes only the rest: before part records, it redid all 100,000."""
    src = tmp_path / "in" / "big.jsonl.zst"
    src.parent.mkdir()
    lines = "".join(json.dumps({"id": f"r{i}", "text": f"row {i} is short"}) + "\n" for i in range(100_000))
    src.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    out = tmp_path / "out"
    args = ["prefilter", "--input", str(src), "--output", str(out), "--concurrency", "256"]
    proc = _start(ray_cluster, args)
    try:
        deadline = time.monotonic() + 240
        while _rows_in_part_records(out) < 90_000:
            assert proc.poll() is None, f"the run ended before 90 % was written: {proc.stdout.read()[-2000:]}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not (out / "_SUCCESS").exists()
    _ok(_run(ray_cluster, args))
    manifest = read_manifest(str(out))
    assert manifest["rows_resumed"] >= 85_000, manifest["rows_resumed"]
    assert manifest["rows_in"] == manifest["rows_out"] == 100_000
    assert read_three_ways(str(out)) == {"plain": 100_000, "duckdb": 100_000, "records": 100_000}


def test_an_input_file_edited_between_runs_is_redone_whole(ray_cluster, tmp_path: Path) -> None:
    """A file split into byte ranges is edited after its units were committed (a row inserted at the
    top shifts every range). Units know their file's version, so the edited file's units are new and
    its old ones leave the output; keyed by name and range only, the rerun kept the old rows and
    never saw the new one, with a balanced manifest."""
    src = tmp_path / "in" / "d.jsonl"
    write_jsonl(src, 300)
    out = tmp_path / "out"
    args = ["prefilter", "--input", str(src.parent), "--output", str(out), "io.split_bytes=65536"]
    _ok(_run(ray_cluster, args))
    first = read_manifest(str(out))
    assert first["units"] >= 3
    src.write_text(json.dumps({"id": "inserted", "text": "a row added at the top"}) + "\n" + src.read_text())
    _ok(_run(ray_cluster, args))
    manifest = read_manifest(str(out))
    assert manifest["units_resumed"] == 0 and manifest["units_dropped"] == first["units"]
    rows = read_output(str(out))
    assert_exactly_once(rows, 301)
    assert "inserted" in {r["id"] for r in rows}
    assert read_three_ways(str(out)) == {"plain": 301, "duckdb": 301, "records": 301}


def test_an_input_file_appended_to_while_it_is_read_fails_the_run_then_resumes(ray_cluster, tmp_path: Path) -> None:
    """A file that changes while its unit is being read is not committed from a mix of versions:
    the run fails naming it (every other unit committed), and the rerun takes the new version."""
    src = tmp_path / "in"
    write_jsonl(src / "a-steady.jsonl", 10)
    growing = write_jsonl(src / "b-growing.jsonl", 40, start=100)
    out = tmp_path / "out"
    args = ["natural_reasoning", "--input", str(src), "--output", str(out), "--concurrency", "4", *SLOW]
    proc = _start(ray_cluster, args)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("_commits/*/*/part-*.json")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with growing.open("a") as handle:  # a writer appending to a file the run is reading
            handle.write(json.dumps({"id": "appended", "text": "a late row"}) + "\n")
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 1, output[-3000:]
    assert "'b-growing.jsonl' changed since the run listed it" in output and "rerun" in output, output[-3000:]
    assert not (out / "_SUCCESS").exists()
    _ok(_run(ray_cluster, args))
    rows = read_output(str(out))
    assert_exactly_once(rows, 51)
    assert "appended" in {r["id"] for r in rows}


def test_a_commit_record_cut_to_nothing_is_redone_not_fatal(ray_cluster, tmp_path: Path) -> None:
    """A power loss can leave a zero-length commit record (before fsync, or on a store that lies
    about it). It commits nothing: the rerun redoes that unit; it used to fail every later run."""
    src = tmp_path / "in"
    for i in range(3):
        write_jsonl(src / f"d{i}.jsonl", 10, start=10 * i)
    out = tmp_path / "out"
    args = ["prefilter", "--input", str(src), "--output", str(out)]
    _ok(_run(ray_cluster, args))
    records = sorted(out.glob(f"_commits/{current_epoch(str(out)):08d}/*.json"))
    assert len(records) == 3
    records[0].write_bytes(b"")
    _ok(_run(ray_cluster, args))
    manifest = read_manifest(str(out))
    assert manifest["units_resumed"] == 2 and manifest["rows_resumed"] == 20
    assert_exactly_once(read_output(str(out)), 30)
    assert read_three_ways(str(out)) == {"plain": 30, "duckdb": 30, "records": 30}
