"""A real single-node SLURM (Debian's slurm-wlm and munge) for the cluster tests.

munged runs as the `munge` user with its socket in a private directory; slurmctld and slurmd run
from a slurm.conf written into a scratch directory, on free ports, with this host as the one node.
Clients find it through `SLURM_CONF` (in `SlurmCluster.env`). Everything is stopped on exit.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    partition: str = "debug"


def _conf(root: Path, host: str, cpus: int, memory_mb: int) -> str:
    return "\n".join(
        [
            "ClusterName=matrixtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=slurm",
            "AuthType=auth/munge",
            f"AuthInfo=socket={root}/munge/munge.socket.2",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/slurmctld.log",
            f"SlurmdLogFile={root}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=300",
            "SchedulerParameters=sched_interval=1",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            "",
        ]
    )


def _wait(what: str, ok, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"SLURM: {what} not ready in {timeout:.0f} s; {log}: {_tail(log)}")
        time.sleep(0.3)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"


@contextmanager
def running_slurm(cpus: int = 2, memory_mb: int = 8000) -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd on this host; yields once `sinfo` shows the node idle."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} not found: run `bash tests/system_deps.sh` (installs slurm-wlm, munge)")
    root = Path(tempfile.mkdtemp(prefix="mx-slurm-"))
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir()
    shutil.chown(root / "munge", "munge")
    shutil.chown(root / "state", "slurm")
    os.chmod(root, 0o755)
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, host, cpus, memory_mb))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []
    try:
        munge = root / "munge"
        files = [f"--socket={munge}/munge.socket.2", f"--pid-file={munge}/munged.pid"]
        files += [f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"]
        munged = ["runuser", "-u", "munge", "--", "munged", "-F", *files]
        procs.append(subprocess.Popen(munged, stderr=subprocess.DEVNULL))
        _wait("munged", lambda: (root / "munge" / "munge.socket.2").exists(), 30, root / "munge" / "munged.log")
        procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env, stderr=subprocess.DEVNULL))

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            return out.strip() == "idle"

        _wait("the node", idle, 60, root / "slurmctld.log")
        yield SlurmCluster(root, env)
    finally:
        if len(procs) == 3:
            _cancel_all(env, root)
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def _cancel_all(env: dict[str, str], root: Path) -> None:
    """End the jobs a failed test left while slurmd runs: stopped, it would orphan their processes."""
    subprocess.run(["scancel", "--user", getpass.getuser(), "--full"], env=env, capture_output=True, check=False)

    def none_left() -> bool:
        return not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip()

    _wait("the end of every job", none_left, 60, root / "slurmd.log")


def squeue(env: dict[str, str], fields: str = "%i %T") -> list[str]:
    """The jobs SLURM still runs or queues, one `fields` line each."""
    out = subprocess.run(["squeue", "-h", "-o", fields], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[:-1]


def cluster_processes(info: dict) -> list[tuple[str, dict[str, str]]]:
    """(command line, environment) of a matrix cluster's processes: every one (raylet, GCS, workers
    that retitle themselves `ray::…`) inherits the cluster's token path in its environment."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            if env.get("RAY_AUTH_TOKEN_PATH") == info["token_file"]:
                found.append((" ".join(proc.cmdline())[:200], env))
    return found


def assert_nothing_left(env: dict[str, str], info: dict, timeout: float = 30) -> None:
    """No job in SLURM's queue and no process of the cluster, within `timeout`."""
    deadline = time.monotonic() + timeout
    while (squeue(env) or cluster_processes(info)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert squeue(env) == [], squeue(env)
    assert [line for line, _ in cluster_processes(info)] == []
