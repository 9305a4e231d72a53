"""The peer-to-peer runtime end to end on a real Ray cluster (`ray start`), with the load simulator.

Each test runs `matrix run` as a subprocess joined to the session's cluster, like a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import ray
from ray.util.state import list_actors

from tests.conftest import (
    CORPUS,
    VENV_BIN,
    assert_exactly_once,
    committed_units,
    read_manifest,
    read_output,
    run_matrix,
)
from tests.corpus import write_jsonl

SIM = ["llm=sim", "llm.decode_s_per_token=0.002", "llm.output_tokens_mean=16"]
# Slow enough that a run lasts long enough to break it in the middle.
SLOW_SIM = [
    "llm=sim",
    "llm.decode_s_per_token=0.05",
    "llm.output_tokens_mean=12",
    "llm.slots=16",
    "io.part_rows=10",
    "io.flush_interval_s=1",
]


def _run(cluster, args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 300):
    result = run_matrix(["run", *args, "--manifest-json"], {**cluster.env, **(env_extra or {})}, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_local_and_s3_outputs_hold_the_same_rows(ray_cluster, s3_server, tmp_path: Path) -> None:
    fs = fsspec.filesystem("s3", **s3_server.storage_options())
    fs.put(str(CORPUS), f"{s3_server.bucket}/corpus", recursive=True)
    local_out = tmp_path / "out"
    s3_out = f"s3://{s3_server.bucket}/out-{os.getpid()}"
    _run(ray_cluster, ["natural_reasoning", "--input", str(CORPUS), "--output", str(local_out), *SIM])
    _run(
        ray_cluster,
        [
            "natural_reasoning",
            "--input",
            f"s3://{s3_server.bucket}/corpus",
            "--output",
            s3_out,
            "--partitions",
            "2",
            *SIM,
        ],
        env_extra=s3_server.env,
    )
    local = read_output(str(local_out))
    remote = read_output(s3_out, s3_server.storage_options())
    assert_exactly_once(local, 240)
    assert_exactly_once(remote, 240)
    drop = {"deliveries", "latency_s"}
    as_map = lambda rows: {r["id"]: {k: v for k, v in r.items() if k not in drop} for r in rows}  # noqa: E731
    assert as_map(local) == as_map(remote)
    manifest = read_manifest(s3_out, s3_server.storage_options())
    assert manifest["rows_in"] == 240 and manifest["rows_out"] == 240
    assert fs.exists(f"{s3_out}/_SUCCESS")


def _parts_written(out: Path) -> list[Path]:
    """Parts written so far: published (their unit committed) or still in staging."""
    return [*out.glob("part-*.parquet"), *out.glob("_staging/*/part-*.parquet")]


def _wait_for_parts(out: Path, at_least: int, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(_parts_written(out)) < at_least:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended before {at_least} parts: {proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {at_least} parts in {out} after {timeout}s")
        time.sleep(0.2)


def _start(cluster, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(VENV_BIN / "matrix"), "run", *args, "--manifest-json"],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# score and question share a chain (one actor): killing it loses rows in both roles at once
@pytest.mark.parametrize("victim", ["-agent-score+question-", "-driver-"])
def test_killing_an_actor_mid_run_loses_and_doubles_nothing(
    ray_cluster, ray_client, tmp_path: Path, victim: str
) -> None:
    """An agent's rows are found by the audit and delivered again; a driver's units are redone."""
    for i in range(4):
        write_jsonl(tmp_path / "in" / f"docs-{i}.jsonl", 50, start=50 * i)
    src = tmp_path / "in" / "docs-0.jsonl"
    out = tmp_path / "out"
    proc = _start(
        ray_cluster,
        [
            "natural_reasoning",
            "--input",
            str(src.parent),
            "--output",
            str(out),
            "--concurrency",
            "40",
            *SLOW_SIM,
            "orchestrator.audit_interval_s=0.5",
        ],
    )
    try:
        _wait_for_parts(out, 2, proc)
        victims = [
            a
            for a in list_actors(address=ray_cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
            if victim in (a.name or "")
        ]
        assert victims, f"no {victim} actor alive"
        if "agent" in victim:  # kill it while it holds rows (on a loaded machine it may start late)
            held = ray.get_actor(victims[0].name, namespace="matrix").held_rows
            deadline = time.monotonic() + 120
            while not ray.get(held.remote(0)) and time.monotonic() < deadline:
                time.sleep(0.05)
        os.kill(victims[0].pid, signal.SIGKILL)  # like an OOM kill: no cleanup, in-flight rows gone
        stdout, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:]
    rows = read_output(str(out))
    assert_exactly_once(rows, 200)
    manifest = read_manifest(str(out))
    if "agent" in victim:
        assert manifest["rows_redelivered"] > 0
    assert not [r for r in rows if r["status"] == "error"], [r["error"] for r in rows if r["status"] == "error"][:5]


def test_sigkill_of_the_run_then_rerun_resumes(ray_cluster, tmp_path: Path) -> None:
    for i in range(4):
        write_jsonl(tmp_path / "in" / f"docs-{i}.jsonl.zst", 50, start=50 * i, compress=True)
    out = tmp_path / "out"
    args = [
        "natural_reasoning",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--concurrency",
        "20",
        *SLOW_SIM,
    ]
    proc = _start(ray_cluster, args)
    try:
        deadline = time.monotonic() + 120
        while not committed_units(str(out)):
            assert proc.poll() is None and time.monotonic() < deadline, "no unit committed"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    committed = len(read_output(str(out)))
    assert 0 < committed < 200
    assert list(out.glob("_staging/*/part-*.parquet"))  # parts of uncommitted units exist, unseen by readers
    # The killed run's lease is taken over at once (its process is gone), and it resumes.
    _run(ray_cluster, args)
    rows = read_output(str(out))
    assert_exactly_once(rows, 200)
    manifest = read_manifest(str(out))
    # Committed units, plus the rows that parts of open units already held (resume inside a unit).
    assert committed <= manifest["rows_resumed"] < 200
    assert manifest["rows_in"] == 200
    # After _SUCCESS the folder holds only committed parts: a plain Parquet reader sees each row once.
    assert_exactly_once(pq.read_table(out, columns=["id"]).to_pylist(), 200)


def test_bad_input_becomes_error_rows(ray_cluster, tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "in" / "good.jsonl", 5).read_bytes()
    big = b'{"id": "huge", "text": "' + b"a" * (20 << 20) + b'"}\n'
    bad = (
        b'{"id": "malformed", "text": "oops"\n'
        b"\n"
        b'{"id": "no-text", "url": "x"}\n'
        b'{"id": "bad-utf8", "text": "caf\xe9"}\n'
        + big
        + b"   \n"
        + b'{"id": "doc-0", "text": "a duplicate of an earlier id"}\n'
        + b"[1, 2]\n"
    )
    (tmp_path / "in" / "good.jsonl").write_bytes(good + bad)
    out = tmp_path / "out"
    _run(ray_cluster, ["natural_reasoning", "--input", str(tmp_path / "in"), "--output", str(out), *SIM])
    rows = {r["id"]: r for r in read_output(str(out))}
    assert len(rows) == 13
    by_reason = {r["id"]: (r["status"], r["error"]) for r in rows.values() if r["status"] != "ok"}
    reasons = " | ".join(f"{s}:{e}" for s, e in by_reason.values())
    assert "malformed JSON" in reasons
    assert "missing field 'text'" in reasons
    assert "invalid UTF-8" in reasons
    assert "over io.max_doc_bytes" in reasons
    assert reasons.count("empty line") == 2
    assert "duplicate id 'doc-0'" in reasons
    assert "not an object" in reasons
    manifest = read_manifest(str(out))
    assert manifest["rows_in"] == 13 and manifest["rows_out"] == 13
    assert manifest["rows_error"] >= 6


def test_partitions_split_large_files_exactly_once(ray_cluster, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "big.jsonl", 300)
    out = tmp_path / "out"
    _run(
        ray_cluster,
        [
            "natural_reasoning",
            "--input",
            str(src),
            "--output",
            str(out),
            "--partitions",
            "3",
            "io.split_bytes=20000",
            *SIM,
        ],
    )
    rows = read_output(str(out))
    assert_exactly_once(rows, 300)
    assert read_manifest(str(out))["units"] >= 3


def test_a_different_config_on_a_used_output_is_refused(ray_cluster, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 10)
    out = tmp_path / "out"
    _run(ray_cluster, ["natural_reasoning", "--input", str(src), "--output", str(out), *SIM])
    changed = [*SIM, "roles.score.max_tokens=8"]
    result = run_matrix(
        ["run", "natural_reasoning", "--input", str(src), "--output", str(out), *changed], ray_cluster.env
    )
    assert result.returncode == 2
    assert "different config" in result.stderr and "--overwrite" in result.stderr
    _run(ray_cluster, ["natural_reasoning", "--input", str(src), "--output", str(out), "--overwrite", *changed])
    assert_exactly_once(read_output(str(out)), 10)
    assert read_manifest(str(out))["rows_resumed"] == 0


def test_sim_server_errors_are_retried_and_counted(ray_cluster, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 120)
    out = tmp_path / "out"
    _run(
        ray_cluster,
        [
            "natural_reasoning",
            "--input",
            str(src),
            "--output",
            str(out),
            *SIM,
            "llm.error_rate=0.2",
            "llm.backoff_s=0.01",
        ],
    )
    rows = read_output(str(out))
    assert_exactly_once(rows, 120)
    manifest = read_manifest(str(out))
    assert manifest["llm_retries"] > 10
    # Five failed attempts in a row are rare (0.2**5); almost every row gets through.
    assert manifest["rows_error"] <= 2


def test_hanging_backend_never_hangs_a_row(ray_cluster, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 60)
    out = tmp_path / "out"
    started = time.monotonic()
    _run(
        ray_cluster,
        [
            "natural_reasoning",
            "--input",
            str(src),
            "--output",
            str(out),
            *SIM,
            "llm.timeout_rate=0.5",
            "llm.timeout_s=1",
            "llm.retries=1",
            "llm.backoff_s=0.01",
            "roles.filter.retries=0",
            "roles.score.retries=0",
            "roles.question.retries=0",
            "orchestrator.row_deadline_s=30",
        ],
        timeout=240,
    )
    rows = read_output(str(out))
    assert_exactly_once(rows, 60)
    errors = [r["error"] for r in rows if r["status"] == "error"]
    assert errors and all("timed out" in e for e in errors), errors[:3]
    assert time.monotonic() - started < 200


@pytest.mark.parametrize("compress", [False, True])
def test_rows_without_ids_get_stable_position_ids(ray_cluster, tmp_path: Path, compress: bool) -> None:
    name = "d.jsonl.zst" if compress else "d.jsonl"
    src = write_jsonl(tmp_path / "in" / name, 8, with_ids=False, compress=compress)
    out = tmp_path / "out"
    _run(ray_cluster, ["natural_reasoning", "--input", str(src.parent), "--output", str(out), *SIM])
    ids = sorted(r["id"] for r in read_output(str(out)))
    sep = ":" if compress else "@"
    assert all(i.startswith(f"{name}{sep}") for i in ids), ids
    assert len(set(ids)) == 8


def test_units_do_not_depend_on_the_partition_count(tmp_path: Path) -> None:
    """One small file is cut so every partition gets work; a resume with other partitions keeps the cut."""
    from matrix_provider.runtime.sources import list_inputs, plan_units, read_unit, split_size
    from matrix_provider.runtime.spec import IOSpec

    src = write_jsonl(tmp_path / "one.jsonl", 1200)
    assert src.stat().st_size < IOSpec().split_bytes
    fs, files = list_inputs(str(src), IOSpec())
    units = plan_units(fs, files, split_size(files, IOSpec(), 4))
    assert len(units) >= 4
    counts = [sum(1 for _ in read_unit(fs, unit, IOSpec())) for unit in units]
    assert all(counts) and sum(counts) == 1200
    assert [u.uid for u in plan_units(fs, files, split_size(files, IOSpec(), 4))] == [u.uid for u in units]
