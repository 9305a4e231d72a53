"""Exactly once outside the happy path: hostile input, loops, broken files, two writers on one output.

Every test runs `matrix run` against the session's real Ray cluster (and SeaweedFS where S3 is
named); CPU-only pipelines or the load simulator keep them short.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from matrix_provider.runtime.lease import Lease, StaleRun, check_generation, read_holder
from matrix_provider.runtime.sink import OutputError, OutputStore
from tests.conftest import REPO, VENV_BIN, assert_exactly_once, committed_units, read_manifest, read_output, run_matrix
from tests.corpus import doc_text, write_jsonl
from tests.fault_proxy import PART_FILES, FaultProxy

FAST_SIM = ["llm=sim", "llm.decode_s_per_token=0.001", "llm.output_tokens_mean=8", "llm.slots=64"]
CORAL = str(REPO / "bench" / "coral_shaped.yaml")


def _matrix(cluster, args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return run_matrix(["run", *args, "--quiet"], {**cluster.env, "PYTHONPATH": str(REPO), **env}, timeout=timeout)


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def test_hostile_corpus_comes_out_exactly_once(ray_cluster, tmp_path: Path) -> None:
    text = doc_text(1)
    hostile = [
        json.dumps({"id": "num-url", "text": text, "url": 42}),
        json.dumps({"id": "list-url", "text": text, "url": [1, "a"]}),
        json.dumps({"id": "object-url", "text": text, "url": {"k": "v"}}),
        # Lone surrogates are valid JSON escapes but not Unicode; json.dumps writes them as escapes.
        json.dumps({"id": "lone-in-url", "text": text, "url": "https://x.test/\ud800"}),
        json.dumps({"id": "lone-in-text", "text": text + " \udc00 tail", "url": "https://x.test/t"}),
        json.dumps({"id": "lone-\ud83d-in-id", "text": text}),
        json.dumps({"id": 1, "text": text}),
        json.dumps({"id": "1", "text": "the same id as a string"}),
        json.dumps({"id": None, "text": 17}),
        # Lines that once escaped the reader and failed the whole run, and every resume of it:
        '{"id": "huge-int", "text": "t", "n": ' + "7" * 5000 + "}",  # json.loads: ValueError, not JSONDecodeError
        json.dumps({"id": "deep-lone", "text": text, "deep": _nested(["\ud800"], 600)}),  # recursion in the repair
        json.dumps({"id": ["a", "list"], "text": text}),
        json.dumps({"id": {"an": "object"}, "text": text}),
        json.dumps({"id": "x", "text": text}),
        json.dumps({"id": "x", "text": text}),  # kept under its position id, hostile.jsonl@<its byte> ...
    ]
    second_x = sum(len(line) + 1 for line in hostile[:-1])
    hostile.append(json.dumps({"id": f"hostile.jsonl@{second_x}", "text": text}))  # ... which this row claims
    src = tmp_path / "in"
    _write_lines(src / "hostile.jsonl", hostile)
    write_jsonl(src / "good.jsonl.zst", 20, compress=True)
    bad_utf8 = pa.array([b"fine", b"bad \xff\xfe value", b"fine too"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["pq-0", "pq-1", "pq-2"], "text": bad_utf8}), src / "bad-utf8.parquet")
    debris = ["spark", "delta", "crc", "hidden"]
    _write_lines(src / "_temporary" / "0" / "part-00000.jsonl", [json.dumps({"id": "spark", "text": text})])
    _write_lines(src / "_delta_log" / "00000000000000000000.json", [json.dumps({"id": "delta", "text": "x"})])
    _write_lines(src / ".part-00000.jsonl.crc", [json.dumps({"id": "crc", "text": "x"})])
    _write_lines(src / "sub" / ".hidden" / "h.jsonl", [json.dumps({"id": "hidden", "text": "x"})])
    out = tmp_path / "out"
    _ok(_matrix(ray_cluster, ["prefilter", "--input", str(src), "--output", str(out)]))
    rows = {r["id"]: r for r in read_output(str(out))}
    assert_exactly_once(list(rows.values()), len(hostile) + 20 + 3)
    errors = {r["id"]: r["error"] for r in rows.values() if r["status"] == "error"}
    assert "integer string conversion" in errors["hostile.jsonl@" + str(sum(len(h) + 1 for h in hostile[:9]))]
    assert rows["deep-lone"]["status"] != "error"
    assert sum("not a string or an integer" in e for e in errors.values()) == 2
    assert rows[f"hostile.jsonl@{second_x}"]["error"].startswith("duplicate id 'x'")
    claimant = [e for e in errors.values() if "has the form of a position id" in e]
    assert len(claimant) == 1 and f"hostile.jsonl@{second_x}" in claimant[0]
    assert rows["pq-0"]["status"] != "error" and rows["pq-2"]["status"] != "error"  # the rest of the batch is kept
    assert "column 'text' holds a value that cannot be read" in errors["bad-utf8.parquet#1"]
    assert not set(debris) & set(rows)
    assert rows["num-url"]["url"] == "42" and rows["list-url"]["url"] == '[1, "a"]'
    assert rows["object-url"]["url"] == '{"k": "v"}'
    assert rows["lone-in-url"]["url"] == "https://x.test/\ufffd"
    assert rows["lone-\ufffd-in-id"]["status"] != "error"
    assert rows["1"]["status"] != "error"  # the first occurrence keeps the id ...
    duplicate = [r for r in rows.values() if "duplicate id '1'" in (r["error"] or "")]
    assert len(duplicate) == 1 and duplicate[0]["id"].startswith("hostile.jsonl@")  # ... the second its position
    assert any("is not a string" in (r["error"] or "") for r in rows.values())
    manifest = read_manifest(str(out))
    assert manifest["rows_in"] == manifest["rows_out"] == len(hostile) + 20 + 3


def _nested(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


def test_a_loop_with_ten_times_more_rows_than_its_queues_finishes(ray_cluster, tmp_path: Path) -> None:
    """proposer <-> critic with 80 rows in flight against roles that work on 2 messages at a time."""
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 120)
    small = ["roles.proposer.replicas=1", "roles.critic.replicas=1"]
    small += ["roles.proposer.max_concurrency=2", "roles.critic.max_concurrency=2"]
    out = tmp_path / "out"
    args = [CORAL, "--input", str(src), "--output", str(out), "--concurrency", "80", *FAST_SIM, *small]
    _ok(_matrix(ray_cluster, args, timeout=240))
    rows = read_output(str(out))
    assert_exactly_once(rows, 120)
    assert max(r["rounds"] or 0 for r in rows) > 1  # rows really looped
    # A runaway loop becomes an error row at orchestrator.max_hops, never a hang.
    out2 = tmp_path / "out2"
    args = [CORAL, "--input", str(src), "--output", str(out2), *FAST_SIM, "params.agree_rate=0"]
    _ok(_matrix(ray_cluster, [*args, "orchestrator.max_hops=5"], timeout=240))
    rows = read_output(str(out2))
    assert_exactly_once(rows, 120)
    assert all(r["status"] == "error" and "routing loop" in r["error"] for r in rows), rows[0]


def test_small_files_do_not_cap_the_rows_in_flight(ray_cluster, tmp_path: Path) -> None:
    """20 files of 10 rows at 80 rows in flight: a driver that held two units at a time kept at most 20
    rows in flight; it now takes more units while its rows in flight stay under its concurrency."""
    src = tmp_path / "in"
    for i in range(20):
        write_jsonl(src / f"f{i:02d}.jsonl", 10, start=10 * i)
    out = tmp_path / "out"
    slow = ["llm=sim", "llm.decode_s_per_token=0.02", "llm.output_tokens_mean=10", "llm.slots=128"]
    args = [CORAL, "--input", str(src), "--output", str(out), "--concurrency", "80", "--partitions", "1", *slow]
    _ok(_matrix(ray_cluster, args, timeout=240))
    assert_exactly_once(read_output(str(out)), 200)
    manifest = read_manifest(str(out))
    assert manifest["units"] == 20
    assert manifest["peak_rows_in_flight"] > 40, manifest["peak_rows_in_flight"]


def test_broken_and_vanishing_files_fail_alone(ray_cluster, tmp_path: Path) -> None:
    src = tmp_path / "in"
    write_jsonl(src / "a-good.jsonl.zst", 30, compress=True)
    whole = write_jsonl(tmp_path / "full.jsonl.zst", 400, start=100, compress=True).read_bytes()
    (src / "b-truncated.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    table = pa.table({"id": [f"pq-{i}" for i in range(10)], "text": [doc_text(i) for i in range(10)]})
    pq.write_table(table, src / "c-corrupt.parquet")
    data = (src / "c-corrupt.parquet").read_bytes()
    (src / "c-corrupt.parquet").write_bytes(data[:-40])  # the footer is gone
    for i in range(3):
        write_jsonl(src / f"d-later-{i}.jsonl", 20, start=1000 + 20 * i)
    out = tmp_path / "out"
    slow = ["llm=sim", "llm.decode_s_per_token=0.02", "llm.output_tokens_mean=10", "io.flush_interval_s=1"]
    args = ["natural_reasoning", "--input", str(src), "--output", str(out), "--concurrency", "8", *slow]
    proc = subprocess.Popen(
        [str(VENV_BIN / "matrix"), "run", *args, "--quiet"],
        env=ray_cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not committed_units(str(out)):  # listed, then deleted before its unit is read
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    (src / "d-later-2.jsonl").unlink()
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    rows = read_output(str(out))
    errors = {r["id"]: r["error"] for r in rows if r["error"] and "could not be read" in r["error"]}
    assert set(errors) == {
        "b-truncated.jsonl.zst!unread",
        "c-corrupt.parquet!unread",
        "d-later-2.jsonl!unread",
    }, errors
    assert "after b-truncated.jsonl.zst:" in errors["b-truncated.jsonl.zst!unread"]
    read_back = [r for r in rows if r["id"].startswith("doc-") and 100 <= int(r["id"][4:]) < 500]
    assert 0 < len(read_back) < 400  # the rows before the fault are kept
    assert len([r for r in rows if r["id"].startswith("doc-") and int(r["id"][4:]) >= 1000]) == 40
    manifest = read_manifest(str(out))
    assert manifest["rows_in"] == manifest["rows_out"] == len(rows) == 30 + len(read_back) + 1 + 1 + 40 + 1


def test_an_output_inside_the_input_is_refused(ray_cluster, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 5)
    result = _matrix(ray_cluster, ["prefilter", "--input", str(src.parent), "--output", str(src.parent / "out")])
    assert result.returncode == 2 and "inside input" in result.stderr, result.stderr


def test_a_second_run_on_a_held_output_exits_2_naming_the_holder(ray_cluster, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 60)
    out = tmp_path / "out"
    slow = ["llm=sim", "llm.decode_s_per_token=0.05", "llm.output_tokens_mean=20", "llm.slots=4"]
    args = ["natural_reasoning", "--input", str(src), "--output", str(out), *slow]
    first = subprocess.Popen(
        [str(VENV_BIN / "matrix"), "run", *args, "--quiet"],
        env=ray_cluster.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("_leases/*.json")):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = _matrix(ray_cluster, args)
        assert second.returncode == 2, second.stderr
        assert "is held by run" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
        overwrite = _matrix(ray_cluster, [*args, "--overwrite"])
        assert overwrite.returncode == 2 and "is held by run" in overwrite.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)


def _age_lease(store: OutputStore, generation: int, seconds: float, **fields: object) -> None:
    """Make a lease file look `seconds` old by the store's clock (a holder that stopped renewing), and
    optionally rewrite fields of it (e.g. a host that is not this one)."""
    path = Path(store.path(f"_leases/{generation:08d}.json"))
    if fields:
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    stamp = path.stat().st_mtime - seconds
    os.utime(path, (stamp, stamp))


def test_a_stale_writer_cannot_commit(tmp_path: Path) -> None:
    """A holder that stopped renewing (a hung run elsewhere) is taken over; its generation is fenced off."""
    store = OutputStore(str(tmp_path / "out"), {})
    store.check_writable()
    old = Lease(store, "oldrun", ttl_s=60)
    old.acquire(lambda holder, generation: generation)
    old._stop.set()  # a hung run: no more heartbeats
    with pytest.raises(OutputError, match="held by run oldrun"):
        Lease(store, "third").acquire(lambda holder, generation: generation)
    _age_lease(store, old.generation, 3600, host="another-host")
    new = Lease(store, "newrun")
    new.acquire(lambda holder, generation: holder.epoch)
    assert new.generation == old.generation + 1 and new.epoch == old.epoch
    with pytest.raises(StaleRun, match="newrun"):
        check_generation(store, old.generation)
    with pytest.raises(StaleRun, match="taken over by run newrun"):
        old.check()
    check_generation(store, new.generation)
    # A late heartbeat of the old holder rewrites only its own generation's file: the fence holds.
    store.put(f"_leases/{old.generation:08d}.json", json.dumps(old._record).encode())
    with pytest.raises(StaleRun):
        check_generation(store, old.generation)
    old.release()  # must not release the new holder's lease
    holder = read_holder(store)
    assert holder is not None and holder.record["run_id"] == "newrun" and holder.is_live()
    new.release()
    assert read_holder(store).record["released"]


def test_two_runs_racing_for_a_dead_holder_cannot_both_win(tmp_path: Path) -> None:
    """B judged generation 1 dead; A took generation 2 meanwhile. B may only create generation 2 (the
    one after the holder it judged), so it is refused instead of fencing A off with a generation 3."""
    store = OutputStore(str(tmp_path / "out"), {})
    store.check_writable()
    first = Lease(store, "first")
    first.acquire(lambda holder, generation: generation)
    first.release()
    a, b = Lease(store, "a"), Lease(store, "b")

    def b_decides_then_a_acquires(holder, generation):
        a.acquire(lambda holder, generation: holder.epoch)  # A completes its acquire between B's read and create
        return holder.epoch

    with pytest.raises(OutputError, match="taken by another run just now"):
        b.acquire(b_decides_then_a_acquires)
    a.check()  # A still holds the output
    assert read_holder(store).record["run_id"] == "a"
    a.release()


def test_liveness_is_judged_by_the_stores_clock_not_the_readers(tmp_path: Path, monkeypatch) -> None:
    """A reader whose clock runs an hour ahead does not take over a holder that renews on time."""
    store = OutputStore(str(tmp_path / "out"), {})
    store.check_writable()
    holder = Lease(store, "live")
    holder.acquire(lambda previous, generation: generation)
    _age_lease(store, holder.generation, 0, host="another-host")  # elsewhere: no pid to look at
    skewed = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: skewed)
    with pytest.raises(OutputError, match="held by run live"):
        Lease(store, "skewed").acquire(lambda previous, generation: generation)
    holder.release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_first_commit_of_a_unit_wins(where: str, tmp_path: Path, request) -> None:
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        store = OutputStore(f"s3://{s3.bucket}/commit-{tmp_path.name}", s3.storage_options())
    else:
        store = OutputStore(str(tmp_path / "out"), {})
    first = {"unit_id": "u1", "attempt": "a", "parts": []}
    assert store.create_unit_record(1, first, lambda: None) == first
    assert store.create_unit_record(1, {**first, "attempt": "b"}, lambda: None)["attempt"] == "a"
    assert list(store.unit_records(1)) == ["u1"]


def test_a_part_write_that_fails_twice_then_succeeds_loses_nothing(ray_cluster, s3_server, tmp_path: Path) -> None:
    """A real S3 (SeaweedFS) behind a proxy that answers the first two part PUTs with 500 InternalError."""
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 50)
    out = f"s3://{s3_server.bucket}/flaky-{tmp_path.name}"
    env = {k: v for k, v in s3_server.env.items() if k != "AWS_ENDPOINT_URL"}
    with FaultProxy(s3_server.endpoint, fail_first=2, path_regex=PART_FILES) as proxy:
        options = [
            f"++io.storage_options.client_kwargs.endpoint_url={proxy.endpoint}",
            "++io.storage_options.config_kwargs.retries.total_max_attempts=1",  # no retries inside botocore
            "io.part_rows=20",
        ]
        _ok(_matrix(ray_cluster, ["prefilter", "--input", str(src), "--output", out, *options], **env))
        assert proxy.failed == 2 and proxy.matched >= 5
    opts = {**s3_server.storage_options(), "client_kwargs": {"endpoint_url": s3_server.endpoint}}
    assert_exactly_once(read_output(out, opts), 50)
    assert read_manifest(out, opts)["rows_out"] == 50


def test_a_slow_row_is_never_blamed(ray_cluster, tmp_path: Path) -> None:
    """An agent too busy to answer for 25 s (its event loop blocked) is slow, not dead: no re-delivery."""
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 1)
    out = tmp_path / "out"
    spec = str(REPO / "tests" / "pipelines" / "blocking.yaml")
    args = [spec, "--input", str(src), "--output", str(out), "params.block_s=25", "orchestrator.audit_interval_s=0.5"]
    _ok(_matrix(ray_cluster, args, timeout=240))
    rows = read_output(str(out))
    assert [(r["status"], r["deliveries"]) for r in rows] == [("ok", 1)], rows
    assert read_manifest(str(out))["rows_redelivered"] == 0


def test_a_driver_that_cannot_restart_fails_the_run_at_once(ray_cluster, tmp_path: Path) -> None:
    """The only partition driver is killed and its restart fails in its constructor: Ray will not
    try again. The run fails naming the cause and releases the output; it used to spin forever
    holding the lease, so every rerun exited 2."""
    from ray.util.state import list_actors

    from tests.pipelines.fragile_driver import FLAG

    FLAG.unlink(missing_ok=True)
    src = write_jsonl(tmp_path / "in" / "d.jsonl", 200)
    out = tmp_path / "out"
    spec = str(REPO / "tests" / "pipelines" / "fragile_driver.yaml")
    args = [spec, "--input", str(src), "--output", str(out), "--concurrency", "4", "io.part_rows=5"]
    proc = subprocess.Popen(
        [str(VENV_BIN / "matrix"), "run", *args, "--quiet"],
        env={**ray_cluster.env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("_commits/*/*/part-*.json")):  # the driver is at work
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        FLAG.touch()
        drivers = [
            a
            for a in list_actors(address=ray_cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
            if "-driver-" in (a.name or "") and a.pid
        ]
        os.kill(max(drivers, key=lambda a: a.pid).pid, signal.SIGKILL)  # the newest: this run's
        output, _ = proc.communicate(timeout=90)
    finally:
        FLAG.unlink(missing_ok=True)
        proc.kill()
    assert proc.returncode == 1, output[-3000:]
    assert "could not be restarted" in output and "cannot start again" in output, output[-3000:]
    rerun = _matrix(ray_cluster, args)  # the output is not held by the dead run
    _ok(rerun)
    assert_exactly_once(read_output(str(out)), 200)


class _NonExclusiveFS(MemoryFileSystem):
    """A store whose "create" overwrites, as some object stores and FUSE mounts do."""

    protocol = "nonexclusive"

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        return super().pipe_file(path, value, **kwargs)


def test_a_store_without_an_exclusive_create_is_refused_by_name(tmp_path: Path) -> None:
    fsspec.register_implementation("nonexclusive", _NonExclusiveFS, clobber=True)
    with pytest.raises(OutputError, match=r"_NonExclusiveFS.*has no exclusive create"):
        OutputStore(f"nonexclusive://{tmp_path.name}/out", {}).check_writable()
    OutputStore(f"memory://{tmp_path.name}/out", {}).check_writable()  # fsspec's own memory store is exclusive


def test_rows_the_admission_check_stops_cannot_pile_up_while_part_writes_retry(
    ray_cluster, s3_server, tmp_path: Path
) -> None:
    """prefilter stops every row in its driver (no credit taken). Part writes fail and back off;
    the driver must stop reading at its concurrency plus one part instead of buffering the unit."""
    src = tmp_path / "in" / "d.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps({"id": f"r{i}", "text": "too short"}) + "\n" for i in range(6000)))
    out = f"s3://{s3_server.bucket}/bounded-{tmp_path.name}"
    env = {k: v for k, v in s3_server.env.items() if k != "AWS_ENDPOINT_URL"}
    with FaultProxy(s3_server.endpoint, fail_first=4, path_regex=PART_FILES) as proxy:
        options = [
            f"++io.storage_options.client_kwargs.endpoint_url={proxy.endpoint}",
            "++io.storage_options.config_kwargs.retries.total_max_attempts=1",
            "io.part_rows=200",
        ]
        args = ["prefilter", "--input", str(src), "--output", out, "--concurrency", "16", *options]
        _ok(_matrix(ray_cluster, args, **env))
        assert proxy.failed == 4
    opts = {**s3_server.storage_options(), "client_kwargs": {"endpoint_url": s3_server.endpoint}}
    manifest = read_manifest(out, opts)
    assert manifest["rows_out"] == 6000
    assert 0 < manifest["peak_rows_held"] <= 16 + 200, manifest["peak_rows_held"]
