"""WARC and WET input end to end: real HTML pages (postgresql-doc-15) written to WARC by the tests,
with faulty records among them, through `matrix run prefilter` on the session's real Ray cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import VENV_BIN, assert_exactly_once, read_manifest, read_output, run_matrix
from tests.output_readers import read_three_ways
from tests.warc_corpus import collapse, write_warc, write_wet

LENIENT = ["params.min_words=0", "params.min_stopword_share=0", "params.min_cues_per_1000_words=0"]
BLOCKS = ("fineweb_quality", "gopher_quality", "gopher_repetition", "c4_quality")
LENIENT += [f"params.{b}.enabled=false" for b in BLOCKS]  # every page passes: the text is what is checked


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_warc_pages_come_out_exactly_once_with_their_text_and_faults_as_rows(ray_cluster, tmp_path: Path) -> None:
    src = tmp_path / "in"
    written = write_warc(src / "crawl-00000.warc.gz", 60)
    wet = {"https://y.test/1": "Text a crawler extracted.", "https://y.test/2": ""}
    write_wet(src / "crawl-00000.warc.wet.gz", wet)
    out = tmp_path / "out"
    # Small units: the .warc.gz is cut into byte ranges, each starting at a gzip member.
    args = ["prefilter", "--input", str(src), "--output", str(out), "--partitions", "2", "io.split_bytes=65536"]
    _ok(run_matrix(["run", *args, *LENIENT, "--quiet"], ray_cluster.env))
    manifest = read_manifest(str(out))
    assert manifest["units"] > 3
    rows = read_output(str(out))
    expected = len(written.ok) + len(written.filtered) + written.errors + 2
    assert_exactly_once(rows, expected)
    by_url = {r["url"]: r for r in rows if r["url"]}
    for url in written.ok:
        page = by_url[url]
        assert page["status"] == "ok" and page["id"].startswith("<urn:uuid:") and page["warc_record_id"] == page["id"]
        assert page["language"] == "en" and page["date"] and written.titles[url] in collapse(page["text"])
        assert "<" not in page["text"][:200]  # text, not markup
    for url, reason in written.filtered.items():
        assert by_url[url]["status"] == "filtered" and by_url[url]["error"].startswith(reason), by_url[url]
    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == written.errors, [r["error"] for r in errors]
    unreadable = [r for r in errors if "cannot be read" in r["error"]]  # no record id to name them by
    assert unreadable and all(r["id"].startswith("crawl-00000.warc.gz@") for r in unreadable)
    assert any("truncated" in r["error"] for r in errors) and any("cannot be read" in r["error"] for r in errors)
    assert by_url["https://y.test/1"]["text"] == "Text a crawler extracted."
    assert by_url["https://y.test/2"]["error"] == "empty conversion record"
    assert manifest["rows_in"] == manifest["rows_out"] == expected


def test_a_run_killed_inside_a_warc_file_resumes_inside_it(ray_cluster, tmp_path: Path) -> None:
    """One .warc.gz of 600 real pages as one unit, killed once parts hold 40 % of it: the rerun
    redoes only the rest (the unit's part records), and every record comes out once."""
    src = tmp_path / "in"
    written = write_warc(src / "crawl.warc.gz", 600, faults=False)
    out = tmp_path / "out"
    args = ["prefilter", "--input", str(src), "--output", str(out), "io.part_rows=20", *LENIENT]
    proc = subprocess.Popen(
        [str(VENV_BIN / "matrix"), "run", *args, "--quiet"], env=ray_cluster.env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while sum(json.loads(p.read_text())["rows"] for p in out.glob("_commits/*/*/*.json") if p.stat().st_size) < 240:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before 40 % was written"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    _ok(run_matrix(["run", *args, "--quiet"], ray_cluster.env))
    manifest = read_manifest(str(out))
    assert manifest["units"] == 1 and manifest["rows_resumed"] >= 240, manifest["rows_resumed"]
    assert read_three_ways(str(out)) == {"plain": 600, "duckdb": 600, "records": 600}
    assert {r["url"] for r in read_output(str(out))} == set(written.ok)
