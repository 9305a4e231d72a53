"""SLURM through its own CLI: `sbatch --parsable`, `squeue --json`, `scancel`.

No scheduler of our own: a job's state and pending reason are SLURM's, read back as SLURM reports
them, and every error carries SLURM's message and the job id.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from matrix_provider.clusters.errors import ClusterError

# squeue's states in which a job holds, or waits for, an allocation (or passes between the two).
LIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING"}
    | {"SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
)
# Ended for a reason to report: a worker task in one of these fails `up` at once with SLURM's reason.
FAILED_STATES = frozenset({"FAILED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "CANCELLED"})
# What the nodes' scripts get of the submitter's environment (sbatch --export; SLURM_* always).
# Never all of it: an Airflow worker's holds its database URL, fernet key and connections.
BASE_EXPORT = ("PATH", "HOME", "LANG", "TZ")


@dataclass(frozen=True)
class JobState:
    state: str  # SLURM's job_state, e.g. PENDING, RUNNING, FAILED, CANCELLED, NODE_FAIL, TIMEOUT
    reason: str  # SLURM's state_reason, e.g. Resources, Priority, PartitionDown, None


@dataclass(frozen=True)
class Allocation:
    """What each node of a cluster asks SLURM for; None leaves SLURM's default."""

    partition: str | None = None
    cpus_per_node: int | None = None
    gpus_per_node: int = 0
    mem: str | None = None
    time: str | None = None
    account: str | None = None
    comment: str | None = None

    def __post_init__(self) -> None:
        if self.gpus_per_node < 0 or (self.cpus_per_node is not None and self.cpus_per_node < 1):
            raise ClusterError("cpus per node must be >= 1 and gpus per node >= 0")


@dataclass(frozen=True)
class SbatchOptions:
    """One batch job of one node (the head), or a job array of one-node tasks (the workers)."""

    name: str
    allocation: Allocation
    array: str | None = None
    dependency: str | None = None
    requeue: bool = False
    export: tuple[str, ...] = ()

    def args(self, log: Path) -> list[str]:
        a = self.allocation
        out = [f"--job-name={self.name}", "--nodes=1", "--ntasks-per-node=1", f"--output={log}"]
        out.append("--export=" + ",".join(dict.fromkeys((*BASE_EXPORT, *self.export))))
        optional = {
            "--partition": a.partition,
            "--cpus-per-task": a.cpus_per_node,
            "--mem": a.mem,
            "--time": a.time,
            "--account": a.account,
            "--comment": a.comment,
            "--array": self.array,
            "--dependency": self.dependency,
        }
        out += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
        if a.gpus_per_node:
            out.append(f"--gpus-per-node={a.gpus_per_node}")
        out.append("--requeue" if self.requeue else "--no-requeue")
        return out


class Slurm:
    """The SLURM CLI on this host (`SLURM_CONF` and PATH as the caller set them)."""

    def __init__(self, env: dict[str, str] | None = None, timeout_s: float = 60.0) -> None:
        self.env = env
        self.timeout_s = timeout_s
        if not shutil.which("sbatch", path=(env or {}).get("PATH")):
            raise ClusterError("SLURM's `sbatch` is not on PATH: run on a SLURM login node, or use --local")

    def _run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                args, input=stdin, capture_output=True, text=True, timeout=self.timeout_s, env=self.env, check=False
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"`{' '.join(args[:2])}` did not answer in {self.timeout_s:.0f} s") from None

    def submit(self, script: str, options: SbatchOptions, log: Path) -> str:
        """Submit a batch script; return its job id. SLURM's refusal is raised with its words."""
        done = self._run(["sbatch", "--parsable", *options.args(log)], stdin="#!/bin/bash\n" + script)
        if done.returncode != 0:
            raise ClusterError(f"sbatch refused the {options.name} job: {_words(done.stderr)}")
        return done.stdout.strip().split(";")[0]

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        """SLURM's state of each job it still knows; of an array, its worst task (failed before live
        before completed). Read with squeue's format output: `squeue --json` in Slurm 22.05 ignores
        every filter (each poll would list every job of every user), and its shape changed in 23.02."""
        if not job_ids:
            return {}
        done = self._run(["squeue", "-h", "--states=all", f"--jobs={','.join(job_ids)}", "-o", "%A|%i|%T|%r"])
        if done.returncode != 0:
            if "Invalid job id" not in done.stderr:
                raise ClusterError(f"squeue failed: {_words(done.stderr)}")
            # One id SLURM has forgotten fails the whole query: ask for each alone.
            return {} if len(job_ids) == 1 else {k: v for job in job_ids for k, v in self.states([job]).items()}
        found: dict[str, JobState] = {}
        for line in done.stdout.splitlines():
            array_id, job_id, state, reason = [*line.split("|", 3), "", "", ""][:4]
            key = array_id if array_id in job_ids else job_id
            new = JobState(state, reason)
            if key in job_ids and (key not in found or _rank(new) > _rank(found[key])):
                found[key] = new
        return found

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            done = self._run(["scancel", *job_ids])
            if done.returncode != 0 and "Invalid job id" not in done.stderr:
                raise ClusterError(f"scancel {' '.join(job_ids)} failed: {_words(done.stderr)}")

    def cancel_named(self, names: list[str]) -> None:
        """Cancel this user's jobs by name: also those submitted but never recorded (a setup killed
        between sbatch's answer and the state file)."""
        for name in names:
            self._run(["scancel", f"--user={getpass.getuser()}", f"--name={name}"])


def _rank(job: JobState) -> int:
    return 2 if job.state in FAILED_STATES else 1 if job.state in LIVE_STATES else 0


def _words(stderr: str) -> str:
    """SLURM's own message without the `sbatch: error:` prefixes."""
    lines = [line.split("error:", 1)[-1].strip() for line in stderr.strip().splitlines() if line.strip()]
    return "; ".join(lines) or "no message"
