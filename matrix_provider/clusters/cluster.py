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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from matrix_provider.clusters.errors import ClusterError
from matrix_provider.clusters.launch import NodeCommand
from matrix_provider.clusters.slurm import LIVE_STATES, JobState, SbatchOptions, Slurm

STATE_ROOT_ENV = "MATRIX_CLUSTER_DIR"


def state_root() -> Path:
    return Path(os.environ.get(STATE_ROOT_ENV) or Path.home() / ".matrix" / "clusters")


@dataclass(frozen=True)
class ClusterSpec:
    name: str = "matrix"
    scheduler: str = "slurm"  # or "local"
    nodes: int = 1
    partition: str | None = None
    cpus_per_node: int | None = None
    gpus_per_node: int = 0
    mem: str | None = None
    time: str | None = None
    account: str | None = None
    comment: str | None = None
    state_dir: str | None = None
    ray: str | None = None  # the `ray` every node runs; default: the one beside this Python

    def __post_init__(self) -> None:
        if self.scheduler not in ("slurm", "local"):
            raise ClusterError(f"scheduler must be 'slurm' or 'local', not {self.scheduler!r}")
        if self.nodes < 1 or self.gpus_per_node < 0 or (self.cpus_per_node is not None and self.cpus_per_node < 1):
            raise ClusterError("nodes and cpus per node must be >= 1, gpus per node >= 0")
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
    """The same scripts as SLURM's, each in its own process group on this machine."""

    def submit(self, script: str, options: SbatchOptions, log: Path) -> str:
        tasks: list[int | None] = [None]
        if options.array:  # "1-K", as the workers' array is written
            tasks = list(range(1, int(options.array.split("-")[1]) + 1))
        pids = []
        for task in tasks:
            env = {**os.environ, **({"SLURM_ARRAY_TASK_ID": str(task)} if task else {})}
            with open(str(log).replace("%j", "local").replace("%A", "local").replace("%a", str(task)), "ab") as out:
                proc = subprocess.Popen(
                    ["bash", "-c", script], stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
                )
            pids.append(str(proc.pid))
        return "local:" + ",".join(pids)

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        return {job: JobState("RUNNING" if any(map(_alive, _pids(job))) else "COMPLETED", "None") for job in job_ids}

    def cancel(self, job_ids: list[str]) -> None:
        """SIGTERM to each `ray start --block` (it stops its node in ~3 s; a SIGTERM to the whole group
        leaves gcs_server and raylet hanging), then SIGKILL to whatever of the group is left."""
        leaders = [pid for job in job_ids for pid in _pids(job) if _alive(pid)]
        for pid in leaders:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(map(_alive, leaders)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in leaders:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def _pids(job: str) -> list[int]:
    return [int(p) for p in job.removeprefix("local:").split(",") if p]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def scheduler_for(kind: str, env: dict[str, str] | None = None) -> Scheduler:
    return LocalScheduler() if kind == "local" else Slurm(env)


def _default_ray() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def up(spec: ClusterSpec, wait_s: float = 600.0, env: dict[str, str] | None = None, log=print) -> ClusterInfo:
    """Submit the head (and worker) jobs, wait until every node has joined; cancel all on failure."""
    scheduler = scheduler_for(spec.scheduler, env)
    directory = spec.directory()
    if (directory / "cluster.json").exists():
        old = ClusterInfo.load(directory)
        if any(s.state in LIVE_STATES for s in scheduler_for(old.scheduler, env).states(old.jobs).values()):
            jobs = ", ".join(old.jobs)
            raise ClusterError(f"cluster {spec.name!r} is already up (jobs {jobs}): `matrix cluster down` first")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in ("head.json", "cluster.json"):
        (directory / stale).unlink(missing_ok=True)
    token_file = directory / "token"
    token_file.touch(mode=0o600)
    token_file.write_text(secrets.token_hex(32))
    ray = spec.ray or _default_ray()
    command = NodeCommand(
        ray=ray,
        python=str(Path(ray).parent / "python") if Path(ray).parent.joinpath("python").exists() else "python3",
        state_dir=str(directory.resolve()),
        token_file=str(token_file.resolve()),
        cpus=spec.cpus_per_node or os.cpu_count() or 1,
        gpus=spec.gpus_per_node,
        tag=secrets.token_hex(3),
    )
    info = ClusterInfo(spec.name, spec.scheduler, str(directory.resolve()), command.token_file, spec.nodes)
    base = SbatchOptions(
        name=f"matrix-{spec.name}-head",
        partition=spec.partition,
        cpus_per_node=spec.cpus_per_node,
        gpus_per_node=spec.gpus_per_node,
        mem=spec.mem,
        time=spec.time,
        account=spec.account,
        comment=spec.comment,
    )
    try:
        info.jobs.append(scheduler.submit(command.head(), base, directory / "head-%j.log"))
        info.save()
        if spec.nodes > 1:
            workers = dataclasses.replace(
                base,
                name=f"matrix-{spec.name}-worker",
                requeue=True,
                array=f"1-{spec.nodes - 1}",
                dependency=f"after:{info.jobs[0]}" if spec.scheduler == "slurm" else None,
            )
            info.jobs.append(scheduler.submit(command.worker(), workers, directory / "worker-%A-%a.log"))
            info.save()
        log(f"submitted {spec.scheduler} jobs {', '.join(info.jobs)}; waiting for {spec.nodes} node(s)")
        _wait_ready(scheduler, info, directory, wait_s)
    except BaseException:
        scheduler.cancel(info.jobs)
        raise
    info.save()
    return info


def _wait_ready(scheduler: Scheduler, info: ClusterInfo, directory: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    alive = 0
    while True:
        states = scheduler.states(info.jobs)
        head = states.get(info.jobs[0], JobState("GONE", "the scheduler no longer knows the job"))
        if head.state not in LIVE_STATES:
            raise ClusterError(
                f"head job {info.jobs[0]} ended before the cluster was up: {head.state} ({head.reason}); "
                f"log: {_log_tail(directory)}"
            )
        if (directory / "head.json").exists() and info.dashboard_url is None:
            head_addr = json.loads((directory / "head.json").read_text())
            info.gcs_address = head_addr["gcs_address"]
            info.dashboard_url = head_addr["dashboard_url"]
            info.metrics_export_port = head_addr["metrics_export_port"]
            info.temp_dir = f"/tmp/mx-{head_addr['job']}"  # as launch.NodeCommand.temp_dir names it
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


def alive_nodes(info: ClusterInfo, timeout_s: float = 5.0) -> int:
    """ALIVE nodes per the head's State API; 0 while the dashboard does not answer yet."""
    try:
        resp = httpx.get(
            f"{info.dashboard_url}/api/v0/nodes",
            params={"limit": 1000, "filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE"},
            headers={"Authorization": f"Bearer {info.token()}"},
            timeout=timeout_s,
        )
    except httpx.HTTPError:
        return 0
    if resp.status_code != 200:
        return 0
    return len(resp.json().get("data", {}).get("result", {}).get("result", []))


def _log_tail(directory: Path, chars: int = 1500) -> str:
    """The newest head log's end: SLURM's or Ray's own words on why the head stopped."""
    logs = sorted(directory.glob("head-*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text(errors="replace")[-chars:].strip() if logs else "(no log)"


def status(state_dir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    info = ClusterInfo.load(state_dir)
    states = scheduler_for(info.scheduler, env).states(info.jobs)
    return {
        **asdict(info),
        "job_states": {job: asdict(states.get(job, JobState("GONE", ""))) for job in info.jobs},
        "alive_nodes": alive_nodes(info) if info.dashboard_url else 0,
    }


def down(state_dir: Path, wait_s: float = 120.0, env: dict[str, str] | None = None) -> list[str]:
    """Cancel every job the cluster has and wait until the scheduler lists none of them live."""
    info = ClusterInfo.load(state_dir)
    scheduler = scheduler_for(info.scheduler, env)
    scheduler.cancel(info.jobs)
    deadline = time.monotonic() + wait_s
    while live := [j for j, s in scheduler.states(info.jobs).items() if s.state in LIVE_STATES]:
        if time.monotonic() > deadline:
            raise ClusterError(f"jobs {', '.join(live)} still live {wait_s:.0f} s after scancel")
        time.sleep(0.5)
    (state_dir / "head.json").unlink(missing_ok=True)
    return info.jobs


def ended(cluster: dict[str, Any], env: dict[str, str] | None = None) -> str | None:
    """None while any job of the cluster (a setup task's XCom) is live, else what became of them.

    Lets a task that lost sight of Ray tell "the dashboard blinked" from "the allocation is gone".
    """
    try:
        states = scheduler_for(cluster["scheduler"], env).states(list(cluster["jobs"]))
    except ClusterError:
        return None  # the scheduler cannot be asked: say nothing rather than guess
    if any(s.state in LIVE_STATES for s in states.values()):
        return None
    gone = JobState("GONE", "no longer known to the scheduler")
    jobs = "; ".join(f"job {job} {s.state} ({s.reason})" for job in cluster["jobs"] if (s := states.get(job, gone)))
    return f"cluster {cluster.get('name')!r} has ended ({cluster['scheduler']}: {jobs})"
