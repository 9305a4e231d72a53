"""Stale writers on a real S3 (SeaweedFS): a run frozen in the middle of a request, taken over, thawed.

The old run reaches S3 through a fault proxy that holds one chosen request (a frozen writer whose
request lands late); the run itself is SIGSTOPped past its lease TTL, a second run takes the
output over (straight to S3), and then the held request is sent on and the old run SIGCONTed.
Whatever the old run does after that, the output must hold every row exactly once for a plain
Parquet reader of the folder, for DuckDB and for the commit records, and the old run must fail
naming the run that took over.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest

from tests.conftest import REPO, VENV_BIN, assert_exactly_once, read_output
from tests.corpus import write_jsonl
from tests.fault_proxy import FaultProxy
from tests.output_readers import read_three_ways

TTL = ["io.lease_ttl_s=2"]
FAST = ["llm=sim", "llm.decode_s_per_token=0.001", "llm.output_tokens_mean=4", "io.flush_interval_s=0.5"]
SLOW = ["llm=sim", "llm.decode_s_per_token=0.04", "llm.output_tokens_mean=10", "llm.slots=4", "io.part_rows=5"]


def _endpoint(url: str) -> list[str]:
    return [f"++io.storage_options.client_kwargs.endpoint_url={url}"]


def _start(cluster, s3, args: list[str]) -> subprocess.Popen[str]:
    env = {**cluster.env, **{k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"}, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [str(VENV_BIN / "matrix"), "run", *args, "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait(condition: Callable[[], bool], what: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended while waiting for {what}: {proc.stdout.read()[-3000:]}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout}s")
        time.sleep(0.1)


class FrozenTakeover:
    """An old run through the proxy, frozen on a held request, then taken over by a new run."""

    def __init__(self, cluster, s3, tmp_path: Path, name: str):
        self.cluster, self.s3 = cluster, s3
        self.src = tmp_path / "in"
        self.out = f"s3://{s3.bucket}/{name}-{tmp_path.name}"
        self.fs = fsspec.filesystem("s3", **s3.storage_options())
        self.proxy = FaultProxy(s3.endpoint, fail_first=0, method=None, path_regex=r"^$").start()
        self.old: subprocess.Popen[str] | None = None
        self.new: subprocess.Popen[str] | None = None

    def key(self) -> str:
        return self.out.removeprefix("s3://")

    def epochs(self) -> list[int]:
        """The epochs opened so far (the new run opens its own right after it took the output over)."""
        self.fs.invalidate_cache()
        return sorted(int(p.rsplit("/", 1)[1].split(".")[0]) for p in self.fs.glob(f"{self.key()}/_epochs/*.json"))

    def unit_records(self, epoch: int) -> int:
        self.fs.invalidate_cache()
        return len(self.fs.glob(f"{self.key()}/_commits/{epoch:08d}/*.json"))

    def start_old(
        self,
        spec: str,
        extra: list[str],
        hold: Callable[[], threading.Event],
        until: Callable[[], bool] = lambda: True,
    ) -> None:
        """Start the old run and hold the first request `hold` arms for once `until()` is true
        (requests held before that are sent on at once and the hold armed again)."""
        args = [spec, "--input", str(self.src), "--output", self.out, *TTL, *extra, *_endpoint(self.proxy.endpoint)]
        self.old = _start(self.cluster, self.s3, args)
        while True:
            held = hold()
            _wait(held.is_set, "held request", proc=self.old)
            if until():
                return
            self.proxy.release()

    def freeze_old_past_its_ttl(self) -> None:
        assert self.old is not None
        os.kill(self.old.pid, signal.SIGSTOP)
        time.sleep(4)  # twice the TTL, by the store's clock too

    def start_new(self, spec: str, extra: list[str]) -> None:
        args = [spec, "--input", str(self.src), "--output", self.out, *TTL, *extra, *_endpoint(self.s3.endpoint)]
        self.new = _start(self.cluster, self.s3, args)

    def thaw_old(self) -> str:
        """Send the held request on, let the old run go on, and return what it printed."""
        assert self.old is not None
        self.proxy.release()
        os.kill(self.old.pid, signal.SIGCONT)
        output, _ = self.old.communicate(timeout=180)
        assert self.old.returncode == 1, output[-3000:]
        return output

    def finish_new(self) -> None:
        assert self.new is not None
        output, _ = self.new.communicate(timeout=300)
        assert self.new.returncode == 0, output[-3000:]

    def check(self, rows: int) -> None:
        options = {**self.s3.storage_options()}
        counts = read_three_ways(self.out, options)
        assert counts == {"plain": rows, "duckdb": rows, "records": rows}, counts
        assert_exactly_once(read_output(self.out, options), rows)

    def close(self) -> None:
        for proc in (self.old, self.new):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(timeout=30)
        self.proxy.stop()


@pytest.fixture
def takeover(ray_cluster, s3_server, tmp_path: Path, request):
    scenario = FrozenTakeover(ray_cluster, s3_server, tmp_path, request.node.name[5:25].replace("_", "-"))
    try:
        yield scenario
    finally:
        scenario.close()


def test_a_run_frozen_in_its_cleanup_deletes_nothing_of_the_run_that_took_over(takeover: FrozenTakeover) -> None:
    """Frozen on the listing its end-of-run sweep starts with, after every unit was committed; a new
    run with --overwrite takes over and finishes; then the old one wakes up and gets that listing,
    which holds the new run's parts. Before fencing, the old run deleted every part its own records
    did not name (all of the new run's), wrote its own `_manifest.json` and exited 0."""
    for i in range(2):
        write_jsonl(takeover.src / f"d{i}.jsonl", 10, start=10 * i)
    # A listing of the output folder itself (decoded query; `exists` probes add max-keys=1). The run
    # also lists it while it takes its lease: those are let through until both units are committed.
    root_listing = rf"^list-type=2&prefix={re.escape(takeover.key().split('/', 1)[1])}/&delimiter=/&encoding-type=url$"
    takeover.start_old(
        "natural_reasoning",
        FAST,
        hold=lambda: takeover.proxy.hold(method="GET", path_regex=r".", query_regex=root_listing),
        until=lambda: takeover.unit_records(1) == 2,
    )
    takeover.freeze_old_past_its_ttl()
    takeover.start_new("natural_reasoning", [*FAST, "--overwrite"])
    takeover.finish_new()
    takeover.check(20)
    output = takeover.thaw_old()
    assert "was taken over by run" in output and "this run (generation 1) stopped" in output, output[-2000:]
    takeover.check(20)


def test_a_commit_record_that_lands_after_an_overwrite_changes_nothing(takeover: FrozenTakeover) -> None:
    """An old driver passed its fence check and its unit's commit record is held on the way; a run
    with --overwrite takes over and clears the output; then the old record lands. Before commit
    records lived in their epoch, it landed where the new run's commit of that unit then lost to
    it, and the new run deleted its own parts: `_SUCCESS` over missing rows."""
    write_jsonl(takeover.src / "d0.jsonl", 12)
    unit_record = r"/_commits/(\d{8}/)?[0-9a-f]{16}\.json$"
    takeover.start_old(
        "natural_reasoning", FAST, hold=lambda: takeover.proxy.hold(method="PUT", path_regex=unit_record)
    )
    takeover.freeze_old_past_its_ttl()
    takeover.start_new("natural_reasoning", [*SLOW, "--overwrite"])
    _wait(lambda: takeover.epochs() == [1, 2], "the new run's epoch", proc=takeover.new)
    takeover.thaw_old()
    takeover.finish_new()
    takeover.check(12)


def test_a_part_that_a_stale_driver_writes_late_is_never_seen(takeover: FrozenTakeover) -> None:
    """An old driver's part write is held; the new run resumes the same output, finishes it and
    writes `_SUCCESS`; then the old part lands. Before parts were staged, it landed in the folder
    and a plain Parquet reader saw its rows twice."""
    write_jsonl(takeover.src / "d0.jsonl", 12)
    part = r"/part-[^/]*\.parquet$"
    takeover.start_old(
        "natural_reasoning", [*FAST, "io.part_rows=4"], hold=lambda: takeover.proxy.hold(method="PUT", path_regex=part)
    )
    takeover.freeze_old_past_its_ttl()
    takeover.start_new("natural_reasoning", FAST)
    takeover.finish_new()
    takeover.check(12)
    takeover.thaw_old()
    takeover.check(12)
