"""Randomized fault schedules against real runs, checked by readers that share no code with the runtime.

A schedule is a seed: it draws a handful of faults and the moments they strike, on a real 3-node Ray
cluster (`ray start` head + 2 workers) with the output on SeaweedFS S3 behind a fault proxy:

    kill_agent    an agent actor SIGKILLed             kill_driver   a partition driver SIGKILLed
    kill_node     a worker node's raylet SIGKILLed (a lost machine; a new node replaces it)
    kill_job      the job (`matrix run`) SIGKILLed, then rerun
    freeze_job    the job SIGSTOPped past its lease TTL, a second run takes over, the first SIGCONTed
    second_run    a second run started against the live one (it must be refused)
    s3_errors     a burst of S3 503s              s3_outage     S3 unreachable for 20 s
    append_input  rows appended to an input file while the runs go on

Runs are started again until one finishes, then once more without faults (the input may have
changed under the last one). The checker then reads the output three ways (tests/output_readers.py)
and counts, against the input as it ended, rows lost, doubled, foreign, and in error, and checks
that every run that lost its lease failed naming the run that took over.

    python -m tests.chaos --schedules 30 [--first-seed 1] [--out FILE]   # what `make chaos` runs
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import psutil

from tests.conftest import REPO, VENV_BIN, S3Server, free_port, start_seaweed, wait_port
from tests.corpus import write_jsonl
from tests.fault_proxy import FaultProxy
from tests.multinode import MultiNodeCluster, kill_worker_raylet, multinode_cluster, replace_worker, wait_node_dead
from tests.output_readers import duckdb_ids, plain_ids, record_ids

KINDS = (
    "kill_agent",
    "kill_driver",
    "kill_node",
    "kill_job",
    "freeze_job",
    "second_run",
    "s3_errors",
    "s3_outage",
    "append_input",
)
TTL_S = 3.0
OUTAGE_S = 20.0
PIPELINE = [
    "natural_reasoning",
    "--partitions",
    "2",
    "--concurrency",
    "12",
    "llm=sim",
    "llm.decode_s_per_token=0.01",
    "llm.output_tokens_mean=8",
    "llm.slots=16",
    "io.part_rows=8",
    "io.flush_interval_s=1",
    f"io.lease_ttl_s={TTL_S}",
    "orchestrator.audit_interval_s=0.5",
    "orchestrator.row_deadline_s=60",
    "roles.filter.replicas=2",
    "roles.score.replicas=2",
]


@dataclass(frozen=True, order=True)
class Fault:
    at: float  # seconds after the schedule's first run started
    kind: str


def draw(seed: int, faults: int | None = None) -> list[Fault]:
    """The schedule of `seed`: 3-5 faults (or `faults`) at random moments of the first 25 s."""
    rng = random.Random(seed)
    count = faults if faults is not None else rng.randint(3, 5)
    return sorted(Fault(round(rng.uniform(2.0, 25.0), 1), rng.choice(KINDS)) for _ in range(count))


@dataclass
class Outcome:
    seed: int
    faults: list[str]
    injected: dict[str, int] = field(default_factory=dict)  # plain dicts: dataclasses.asdict mangles a Counter
    skipped: dict[str, int] = field(default_factory=dict)
    runs: list[int] = field(default_factory=list)  # exit codes, in order
    rows_expected: int = 0
    readers: dict[str, dict[str, int]] = field(default_factory=dict)  # reader -> lost/doubled/foreign
    rows_error: int = 0
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.violations and all(not any(v.values()) for v in self.readers.values())


class Schedule:
    """One seed's faults against one output; `run()` returns its Outcome."""

    def __init__(self, cluster: MultiNodeCluster, s3: S3Server, proxy: FaultProxy, workdir: Path, seed: int):
        self.cluster, self.s3, self.proxy = cluster, s3, proxy
        self.seed = seed
        self.rng = random.Random(seed * 7919)
        self.src = workdir / f"in-{seed}"
        self.out = f"s3://{s3.bucket}/chaos-{seed}-{os.getpid()}"
        self.outcome = Outcome(seed, [f"{f.kind}@{f.at}" for f in draw(seed)])
        self.current: subprocess.Popen[str] | None = None
        self.frozen: list[tuple[subprocess.Popen[str], dict[str, bool]]] = []  # (run, {"taken": taken over})
        self.others: list[subprocess.Popen[str]] = []  # runs that must not have taken the output
        self.threads: list[threading.Thread] = []
        self.next_row = 10_000

    # -- runs --------------------------------------------------------------------------------------
    def _start(self) -> subprocess.Popen[str]:
        args = [*PIPELINE[:1], "--input", str(self.src), "--output", self.out, *PIPELINE[1:]]
        args.append(f"++io.storage_options.client_kwargs.endpoint_url={self.proxy.endpoint}")
        return subprocess.Popen(
            [str(VENV_BIN / "matrix"), "run", *args, "--quiet"],
            env=self.cluster.env,
            cwd=self.cluster.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def _generations(self) -> int:
        """How many runs have taken the output so far (lease files; `_leases/` only grows)."""
        fs = fsspec.filesystem("s3", **self.s3.storage_options())
        fs.invalidate_cache()
        return len(fs.glob(f"{self.out.removeprefix('s3://')}/_leases/*.json"))

    def _lease_pids(self) -> set[int]:
        """The pids of the runs that have held the output (each lease file names its run's pid)."""
        fs = fsspec.filesystem("s3", **self.s3.storage_options())
        fs.invalidate_cache()
        files = fs.glob(f"{self.out.removeprefix('s3://')}/_leases/*.json")
        return {int(json.loads(fs.cat_file(f)).get("pid", -1)) for f in files}

    def run(self) -> Outcome:
        started = time.monotonic()
        self._write_input()
        faults = collections.deque(draw(self.seed))
        self.current = self._start()
        while True:
            now = time.monotonic() - started
            while faults and faults[0].at <= now and self.current is not None:
                self._inject(faults.popleft().kind)
            if self.current.poll() is not None:
                self._collect(self.current)
                if self.current.returncode == 0:  # faults still due strike nothing: skipped
                    break
                if len(self.outcome.runs) > 12:
                    self.outcome.violations.append(f"no run finished after {len(self.outcome.runs)} runs")
                    break
                self.current = self._start()
            time.sleep(0.2)
        for fault in faults:
            _count(self.outcome.skipped, fault.kind)
        for thread in self.threads:
            thread.join(timeout=OUTAGE_S + 30)
        final = self._start()  # the input may have changed under the last run: it must converge
        self._collect(final, timeout=300)
        if final.returncode != 0:
            self.outcome.violations.append("the final run without faults failed")
        self._thaw_all()
        for proc in self.others:
            self._collect(proc)
            self.outcome.runs.pop()  # not one of the schedule's own runs
            self._check_refused(proc)
        self._check()
        self.outcome.seconds = round(time.monotonic() - started, 1)
        return self.outcome

    def _collect(self, proc: subprocess.Popen[str], timeout: float = 300) -> None:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.outcome.violations.append(f"a run hung for {timeout}s")
            _kill(proc)
            output, _ = proc.communicate()
        proc.output = output  # type: ignore[attr-defined]
        self.outcome.runs.append(proc.returncode)

    # -- faults ------------------------------------------------------------------------------------
    def _inject(self, kind: str) -> None:
        done = getattr(self, f"_{kind}")()
        _count(self.outcome.injected if done is not False else self.outcome.skipped, kind)

    def _actor(self, part: str) -> bool:
        # Imported here, after tests.conftest set RAY_AUTH_MODE=token: Ray reads it once, at import,
        # and `python -m tests.chaos` (make chaos) would otherwise ask the State API without the token.
        from ray.util.state import list_actors

        actors = [
            a
            for a in list_actors(address=self.cluster.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
            if part in (a.name or "") and a.pid
        ]
        if not actors:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.rng.choice(actors).pid, signal.SIGKILL)
        return True

    def _kill_agent(self) -> bool:
        return self._actor("-agent-")

    def _kill_driver(self) -> bool:
        return self._actor("-driver-")

    def _kill_node(self) -> bool:
        index = self.rng.randrange(len(self.cluster.workers))
        if not psutil.pid_exists(self.cluster.workers[index].raylet_pid):  # still being replaced
            return False
        node_id = kill_worker_raylet(self.cluster, index)
        wait_node_dead(self.cluster, node_id)
        self.threads.append(_background(lambda: replace_worker(self.cluster, index)))
        return True

    def _kill_job(self) -> bool:
        assert self.current is not None
        if self.current.poll() is not None:
            return False
        _kill(self.current)
        return True

    def _freeze_job(self) -> bool:
        """SIGSTOP the run past its TTL and start another; SIGCONT the first 1-8 s after the other
        took the output over (or after 60 s if it could not: then the first may finish normally)."""
        assert self.current is not None
        if self.current.poll() is not None:
            return False
        frozen, verdict = self.current, {"taken": False}
        os.killpg(frozen.pid, signal.SIGSTOP)
        before = self._generations()
        # Only a run that held the output can be taken over: one frozen before it took its lease
        # may take it legitimately once thawed (after the other run finished) and end on its own terms.
        held = frozen.pid in self._lease_pids()
        self.frozen.append((frozen, verdict))
        time.sleep(2 * TTL_S + 1)  # past the TTL by the store's clock
        self.current = self._start()
        thaw_in = self.rng.uniform(1.0, 8.0)

        def thaw() -> None:
            deadline = time.monotonic() + 60
            while self._generations() <= before and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(thaw_in)
            verdict["taken"] = held and self._generations() > before
            _cont(frozen)

        self.threads.append(_background(thaw))
        return True

    def _second_run(self) -> bool:
        self.others.append(self._start())
        return True

    def _s3_errors(self) -> bool:
        self.proxy.rule(method=None, path_regex=".", fail_first=self.rng.randint(3, 12), status=503)
        return True

    def _s3_outage(self) -> bool:
        def down() -> None:
            with self.proxy.outage():
                time.sleep(OUTAGE_S)

        self.threads.append(_background(down))
        return True

    def _append_input(self) -> bool:
        target = self.src / "c-appended.jsonl"
        rows = self.rng.randint(3, 10)
        with target.open("a") as handle:
            for i in range(self.next_row, self.next_row + rows):
                handle.write(json.dumps({"id": f"doc-{i}", "text": _text(i), "url": f"https://x.test/{i}"}) + "\n")
        self.next_row += rows
        return True

    # -- checks ------------------------------------------------------------------------------------
    def _write_input(self) -> None:
        write_jsonl(self.src / "a.jsonl", 60)
        write_jsonl(self.src / "b.jsonl.zst", 60, start=100, compress=True)
        write_jsonl(self.src / "c-appended.jsonl", 40, start=200)

    def _thaw_all(self) -> None:
        for proc, verdict in self.frozen:
            _cont(proc)
            self._collect(proc)
            code, output = proc.returncode, getattr(proc, "output", "")
            if verdict["taken"] and code == 0:
                self.outcome.violations.append("a frozen run that was taken over exited 0")
            # Frozen before it took its lease, it is refused (exit 2) instead: the other run holds the output.
            named = "taken over by run" in output or (code == 2 and "is held by" in output)
            if verdict["taken"] and not named:
                self.outcome.violations.append(f"a run that was taken over did not name the taker: {output[-300:]}")

    def _check_refused(self, proc: subprocess.Popen[str]) -> None:
        """A run started against a live one exits 2 naming the holder (0 or 1 if the holder had ended)."""
        if proc.returncode not in (0, 1, 2):
            output = getattr(proc, "output", "")
            self.outcome.violations.append(f"a second run exited {proc.returncode}: {output[-300:]}")

    def _check(self) -> None:
        expected = set()
        for path in sorted(self.src.iterdir()):
            data = path.read_bytes()
            if path.suffix == ".zst":
                import zstandard

                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            expected |= {json.loads(line)["id"] for line in data.splitlines() if line.strip()}
        self.outcome.rows_expected = len(expected)
        options = self.s3.storage_options()
        for name, reader in (("plain", plain_ids), ("duckdb", duckdb_ids), ("records", record_ids)):
            try:
                ids = reader(self.out, options)
            except Exception as exc:  # an unreadable output is the worst outcome of all
                self.outcome.violations.append(f"{name} reader failed: {type(exc).__name__}: {exc}")
                continue
            counts = collections.Counter(ids)
            self.outcome.readers[name] = {
                "lost": len(expected - set(counts)),
                "doubled": sum(n - 1 for n in counts.values() if n > 1),
                "foreign": len(set(counts) - expected),
            }
        fs = fsspec.filesystem("s3", **options)
        manifest = json.loads(fs.cat_file(f"{self.out.removeprefix('s3://')}/_manifest.json"))
        self.outcome.rows_error = manifest["rows_error"]


def _count(counts: dict[str, int], kind: str) -> None:
    counts[kind] = counts.get(kind, 0) + 1


def _text(i: int) -> str:
    from tests.corpus import doc_text

    return doc_text(i)


def _background(target: Any) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)


def _cont(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)


@contextlib.contextmanager
def chaos_stand(workdir: Path, s3: S3Server | None = None) -> Iterator[tuple[MultiNodeCluster, S3Server, FaultProxy]]:
    """The 3-node cluster, an S3 (the given one, or a SeaweedFS of our own) and the fault proxy."""
    with contextlib.ExitStack() as stack:
        if s3 is None:
            s3 = stack.enter_context(_own_seaweed(workdir / "seaweed"))
        serve = {"MATRIX_SERVE_PORT": str(free_port())}  # Serve's HTTP port: never a default another cluster holds
        cluster = stack.enter_context(multinode_cluster(workdir, workers=2, num_cpus=2, extra_env={**s3.env, **serve}))
        proxy = stack.enter_context(FaultProxy(s3.endpoint, fail_first=0, method=None, path_regex=r"^$"))
        yield cluster, s3, proxy


@contextlib.contextmanager
def _own_seaweed(data: Path) -> Iterator[S3Server]:
    data.mkdir(parents=True, exist_ok=True)
    creds = {"AWS_ACCESS_KEY_ID": "matrixchaos", "AWS_SECRET_ACCESS_KEY": "matrixchaossecret"}
    proc, port = start_seaweed(data, "matrix-chaos", creds)
    try:
        wait_port(port, timeout=60)
        endpoint = f"http://127.0.0.1:{port}"
        s3 = S3Server(
            endpoint, "matrix-chaos", {**creds, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        )
        fs = fsspec.filesystem("s3", **s3.storage_options())
        deadline = time.monotonic() + 60
        while True:
            try:
                fs.pipe(f"{s3.bucket}/.ready", b"1")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield s3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def table(outcomes: list[Outcome]) -> str:
    """What `make chaos` prints: schedules run, faults injected by kind, rows lost, doubled, in error."""
    from rich.console import Console
    from rich.table import Table

    injected = sum((collections.Counter(o.injected) for o in outcomes), collections.Counter())
    summary = Table(title=f"{len(outcomes)} schedules, {sum(injected.values())} faults injected")
    for column in ("seed", "faults", "runs", "rows", "lost", "doubled", "foreign", "errors", "violations", "s"):
        summary.add_column(column)
    for o in outcomes:
        worst = {k: max((r.get(k, 0) for r in o.readers.values()), default=0) for k in ("lost", "doubled", "foreign")}
        summary.add_row(
            str(o.seed),
            ", ".join(o.faults),
            " ".join(map(str, o.runs)),
            str(o.rows_expected),
            str(worst["lost"]),
            str(worst["doubled"]),
            str(worst["foreign"]),
            str(o.rows_error),
            "; ".join(o.violations) or "-",
            str(o.seconds),
        )
    kinds = Table(title="faults injected by kind (skipped: the run had already finished)")
    for kind in KINDS:
        kinds.add_column(kind)
    skipped = sum((collections.Counter(o.skipped) for o in outcomes), collections.Counter())
    kinds.add_row(*(f"{injected[k]} ({skipped[k]})" for k in KINDS))
    console = Console(width=200, record=True)
    console.print(summary)
    console.print(kinds)
    return console.export_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", type=int, default=30)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "chaos.json"))
    args = parser.parse_args(argv)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-", dir="/tmp") as tmp, chaos_stand(Path(tmp)) as stand:
        for seed in range(args.first_seed, args.first_seed + args.schedules):
            outcome = Schedule(*stand, Path(tmp), seed).run()
            outcomes.append(outcome)
            print(f"seed {seed}: {'clean' if outcome.clean else 'VIOLATED'} {asdict(outcome)}", flush=True)
    print(table(outcomes))
    total = round(time.monotonic() - started)
    Path(args.out).write_text(
        json.dumps({"seconds": total, "outcomes": [asdict(o) for o in outcomes]}, indent=1, default=dict)
    )
    print(f"{len(outcomes)} schedules in {total} s; {sum(not o.clean for o in outcomes)} violated")
    return 0 if all(o.clean for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
