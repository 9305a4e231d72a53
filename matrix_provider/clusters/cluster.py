"""Bring a Ray cluster up as batch jobs, follow it, tear it down: `matrix cluster up|status|down`.

One head job (never requeued: its address is the cluster's) and, for more than one node, one job
array of workers that SLURM requeues when a node is preempted or fails; a requeued worker reads
the head's address again and rejoins. Everything a cluster has lives in its state directory
(`~/.matrix/clusters/<name>/`, or `--state-dir`; on SLURM it must be on a filesystem the nodes
share): `cluster.json` (what was submitted and the addresses), `token` (0600), `head.json`
(written by the head node) and the jobs' logs. `up` cancels whatever it submitted when it fails,
and `down` cancels every job the state names, so a failed start orphans nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from matrix_provider.clusters.errors import ClusterError
from matrix_provider.clusters.launch import NodeCommand, temp_dir
from matrix_provider.clusters.slurm import (
    BASE_EXPORT,
    FAILED_STATES,
    LIVE_STATES,
    Allocation,
    JobState,
    SbatchOptions,
    Slurm,
)

STATE_ROOT_ENV = "MATRIX_CLUSTER_DIR"
GONE = JobState("GONE", "no longer known to the scheduler")


def state_root() -> Path:
    return Path(os.environ.get(STATE_ROOT_ENV) or Path.home() / ".matrix" / "clusters")


@dataclass(frozen=True)
class ClusterSpec:
    name: str = "matrix"
    scheduler: str = "slurm"  # or "local"
    nodes: int = 1
    allocation: Allocation = field(default_factory=Allocation)
    export: tuple[str, ...] = ()  # environment variables the nodes get besides PATH, HOME, LANG, TZ
    state_dir: str | None = None
    ray: str | None = None  # the `ray` every node runs; default: the one beside this Python

    def __post_init__(self) -> None:
        if self.scheduler not in ("slurm", "local"):
            raise ClusterError(f"scheduler must be 'slurm' or 'local', not {self.scheduler!r}")
        if self.nodes < 1:
            raise ClusterError(f"a cluster needs at least one node, not {self.nodes}")
        if not self.name or any(c in self.name for c in "/ \t\n"):
            raise ClusterError(f"cluster name {self.name!r} must be a non-empty word")

    def directory(self) -> Path:
        return Path(self.state_dir) if self.state_dir else state_root() / self.name


@dataclass
class ClusterInfo:
    """What `up` hands on (printed, and the Airflow setup task's XCom): addresses, never the token."""

    name: str
    scheduler: str
    state_dir: str
    token_file: str
    nodes: int
    jobs: list[str] = field(default_factory=list)
    gcs_address: str | None = None
    dashboard_url: str | None = None
    metrics_export_port: int | None = None
    temp_dir: str | None = None
    tag: str = ""  # this cluster's own mark (in its nodes' temp dirs and head.json)

    def save(self) -> None:
        path = Path(self.state_dir) / "cluster.json"
        path.with_suffix(".tmp").write_text(json.dumps(asdict(self), indent=1))
        path.with_suffix(".tmp").replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> ClusterInfo:
        try:
            return cls(**json.loads((state_dir / "cluster.json").read_text()))
        except FileNotFoundError:
            raise ClusterError(f"no cluster at {state_dir}: `matrix cluster up` writes it") from None

    def token(self) -> str:
        return Path(self.token_file).read_text().strip()


class Scheduler(Protocol):
    def submit(self, script: str, options: SbatchOptions, log: Path) -> str: ...
    def states(self, job_ids: list[str]) -> dict[str, JobState]: ...
    def cancel(self, job_ids: list[str]) -> None: ...


class LocalScheduler:
    """The same scripts as SLURM's, each in its own process group on this machine.

    A job id records each group leader as `pid@start-time`, so a pid reused after a reboot is never
    taken for ours; every process of the cluster inherits its token path in its environment, which
    is how `cancel` finds all of them, also those whose leader died first.
    """

    def __init__(self, token_file: str) -> None:
        self.token_file = token_file

    def submit(self, script: str, options: SbatchOptions, log: Path) -> str:
        tasks: list[int | None] = [None]
        if options.array:  # "1-K", as the workers' array is written
            tasks = list(range(1, int(options.array.split("-")[1]) + 1))
        allowed = {k: os.environ[k] for k in (*BASE_EXPORT, *options.export) if k in os.environ}
        leaders = []
        for task in tasks:
            env = {**allowed, **({"SLURM_ARRAY_TASK_ID": str(task)} if task else {})}
            with open(str(log).replace("%j", "local").replace("%A", "local").replace("%a", str(task)), "ab") as out:
                proc = subprocess.Popen(
                    ["bash", "-c", script], stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
                )
            leaders.append(f"{proc.pid}@{_started(proc.pid)}")
        return "local:" + ",".join(leaders)

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        return {job: JobState("RUNNING" if _leaders(job) else "COMPLETED", "None") for job in job_ids}

    def cancel(self, job_ids: list[str]) -> None:
        """SIGTERM to each `ray start --block` (it stops its node in ~3 s; a SIGTERM to the whole group
        leaves gcs_server and raylet hanging), then SIGKILL to every process of the cluster left."""
        leaders = [pid for job in job_ids for pid in _leaders(job)]
        for pid in leaders:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(_started(pid) for pid in leaders) and time.monotonic() < deadline:
            time.sleep(0.2)
        mark = f"RAY_AUTH_TOKEN_PATH={self.token_file}\0".encode()
        for environ in Path("/proc").glob("[0-9]*/environ"):
            with contextlib.suppress(OSError):
                if mark in environ.read_bytes():
                    os.kill(int(environ.parent.name), signal.SIGKILL)


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _leaders(job: str) -> list[int]:
    """The job's group leaders that still run (same pid and the same start time as recorded)."""
    out = []
    for leader in job.removeprefix("local:").split(","):
        pid, _, start = leader.partition("@")
        if pid and _started(int(pid)) == start:
            out.append(int(pid))
    return out


def scheduler_for(info: ClusterInfo, env: dict[str, str] | None = None) -> Scheduler:
    return LocalScheduler(info.token_file) if info.scheduler == "local" else Slurm(env)


def _default_ray() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def up(
    spec: ClusterSpec,
    wait_s: float = 600.0,
    env: dict[str, str] | None = None,
    log: Callable[[str], Any] = print,
    replace: bool = False,
    stop: threading.Event | None = None,
) -> ClusterInfo:
    """Submit the head (and worker) jobs, wait until every node has joined; cancel all on failure.

    `replace`: a cluster of this name that is still up is cancelled first (an Airflow retry of the
    same run's setup), else refused. `stop`: set from another thread (a task being killed) to give
    up at the next step, cancelling what was submitted.
    """
    directory = spec.directory()
    if (directory / "cluster.json").exists():
        old = ClusterInfo.load(directory)
        if any(s.state in LIVE_STATES for s in scheduler_for(old, env).states(old.jobs).values()):
            if not replace:
                jobs = ", ".join(old.jobs)
                raise ClusterError(f"cluster {spec.name!r} is already up (jobs {jobs}): `matrix cluster down` first")
            log(f"cancelling the earlier cluster {spec.name!r} (jobs {', '.join(old.jobs)})")
            down(directory, env=env)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in ("head.json", "cluster.json"):
        (directory / stale).unlink(missing_ok=True)
    token_file = directory / "token"
    token_file.touch(mode=0o600)
    token_file.write_text(secrets.token_hex(32))
    ray = spec.ray or _default_ray()
    beside = Path(ray).parent / "python"
    command = NodeCommand(
        ray=ray,
        python=str(beside) if beside.exists() else "python3",
        state_dir=str(directory.resolve()),
        token_file=str(token_file.resolve()),
        cpus=spec.allocation.cpus_per_node or os.cpu_count() or 1,
        gpus=spec.allocation.gpus_per_node,
        tag=secrets.token_hex(3),
    )
    info = ClusterInfo(spec.name, spec.scheduler, command.state_dir, command.token_file, spec.nodes, tag=command.tag)
    scheduler = scheduler_for(info, env)
    head_name, worker_name = job_names(spec.name)
    base = SbatchOptions(name=head_name, allocation=spec.allocation, export=spec.export)
    try:
        _check_stop(stop)
        info.jobs.append(scheduler.submit(command.head(), base, directory / "head-%j.log"))
        info.save()
        if spec.nodes > 1:
            _check_stop(stop)
            workers = dataclasses.replace(
                base,
                name=worker_name,
                requeue=True,
                array=f"1-{spec.nodes - 1}",
                dependency=f"after:{info.jobs[0]}" if spec.scheduler == "slurm" else None,
            )
            info.jobs.append(scheduler.submit(command.worker(), workers, directory / "worker-%A-%a.log"))
            info.save()
        log(f"submitted {spec.scheduler} jobs {', '.join(info.jobs)}; waiting for {spec.nodes} node(s)")
        _wait_ready(scheduler, info, directory, wait_s, stop)
    except BaseException:
        _cancel(scheduler, info)
        raise
    info.save()
    return info


def job_names(name: str) -> list[str]:
    return [f"matrix-{name}-head", f"matrix-{name}-worker"]


def _cancel(scheduler: Scheduler, info: ClusterInfo) -> None:
    """Cancel the cluster's jobs; on SLURM also any of its name never recorded (a setup killed
    between sbatch's answer and the state file)."""
    scheduler.cancel(info.jobs)
    if isinstance(scheduler, Slurm):
        scheduler.cancel_named(job_names(info.name))


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise ClusterError("stopped while bringing the cluster up; what was submitted is cancelled")


def _wait_ready(
    scheduler: Scheduler, info: ClusterInfo, directory: Path, wait_s: float, stop: threading.Event | None
) -> None:
    deadline = time.monotonic() + wait_s
    alive = 0
    while True:
        _check_stop(stop)
        states = scheduler.states(info.jobs)
        head = states.get(info.jobs[0], GONE)
        if head.state not in LIVE_STATES:
            raise ClusterError(
                f"head job {info.jobs[0]} ended before the cluster was up: {head.state} ({head.reason}); "
                f"log: {_log_tail(directory, 'head')}"
            )
        for job in info.jobs[1:]:
            if states.get(job, GONE).state in FAILED_STATES:
                worker = states[job]
                raise ClusterError(
                    f"worker job {job} failed before the cluster was up: {worker.state} ({worker.reason}); "
                    f"log: {_log_tail(directory, 'worker')}"
                )
        if info.dashboard_url is None:
            _read_head(info, directory)
        if info.dashboard_url:
            alive = alive_nodes(info)
            if alive >= info.nodes:
                return
        if time.monotonic() > deadline:
            pending = "; ".join(f"job {job}: {s.state} ({s.reason})" for job, s in states.items())
            raise ClusterError(
                f"cluster {info.name!r} not up after {wait_s:.0f} s ({alive} of {info.nodes} nodes joined); "
                f"{pending}; cancelled"
            )
        time.sleep(1.0)


def _read_head(info: ClusterInfo, directory: Path) -> None:
    """The head's addresses, once this cluster's head (its tag) has written them."""
    try:
        head = json.loads((directory / "head.json").read_text())
    except FileNotFoundError:
        return
    except ValueError as exc:
        raise ClusterError(f"the head wrote an unreadable {directory / 'head.json'}: {exc}") from None
    if not str(head.get("job", "")).startswith(f"{info.tag}-"):
        return  # another cluster's head (an earlier one of this name): not ours
    info.gcs_address = head["gcs_address"]
    info.dashboard_url = head["dashboard_url"]
    info.metrics_export_port = head["metrics_export_port"]
    info.temp_dir = temp_dir(head["job"])


def alive_nodes(info: ClusterInfo, timeout_s: float = 5.0) -> int:
    """ALIVE nodes per the head's State API; 0 while the dashboard does not answer (well) yet."""
    try:
        resp = httpx.get(
            f"{info.dashboard_url}/api/v0/nodes",
            params={"limit": 1000, "filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE"},
            headers={"Authorization": f"Bearer {info.token()}"},
            timeout=timeout_s,
        )
        return len(resp.json()["data"]["result"]["result"]) if resp.status_code == 200 else 0
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return 0


def _log_tail(directory: Path, kind: str, chars: int = 1500) -> str:
    """The newest head or worker log's end: SLURM's or Ray's own words on why it stopped."""
    logs = sorted(directory.glob(f"{kind}-*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text(errors="replace")[-chars:].strip() if logs else "(no log)"


def status(state_dir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    info = ClusterInfo.load(state_dir)
    states = scheduler_for(info, env).states(info.jobs)
    return {
        **asdict(info),
        "job_states": {job: asdict(states.get(job, GONE)) for job in info.jobs},
        "alive_nodes": alive_nodes(info) if info.dashboard_url else 0,
    }


def down(state_dir: Path, wait_s: float = 120.0, env: dict[str, str] | None = None) -> list[str]:
    """Cancel every job the cluster has and wait until the scheduler lists none of them live."""
    info = ClusterInfo.load(state_dir)
    scheduler = scheduler_for(info, env)
    _cancel(scheduler, info)
    deadline = time.monotonic() + wait_s
    while live := [j for j, s in scheduler.states(info.jobs).items() if s.state in LIVE_STATES]:
        if time.monotonic() > deadline:
            raise ClusterError(f"jobs {', '.join(live)} still live {wait_s:.0f} s after scancel")
        time.sleep(0.5)
    (state_dir / "head.json").unlink(missing_ok=True)
    return info.jobs


def ended(cluster: dict[str, Any], env: dict[str, str] | None = None) -> str | None:
    """None while the cluster's head job (from a setup task's XCom) is live, else what became of it.

    Lets a task that lost sight of Ray tell "the dashboard blinked" from "the allocation is gone".
    The head alone decides: workers may still be pending or requeued when the head is gone.
    """
    try:
        info = ClusterInfo(**cluster)
        head = scheduler_for(info, env).states(info.jobs[:1]).get(info.jobs[0], GONE)
    except (ClusterError, TypeError, IndexError):
        return None  # the scheduler cannot be asked: say nothing rather than guess
    if head.state in LIVE_STATES:
        return None
    return f"cluster {info.name!r} has ended ({info.scheduler}: head job {info.jobs[0]} {head.state} ({head.reason}))"
