"""SLURM through its own CLI: `sbatch --parsable`, `squeue --json`, `scancel`.

No scheduler of our own: a job's state and pending reason are SLURM's, read back as SLURM reports
them, and every error carries SLURM's message and the job id.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from matrix_provider.clusters.errors import ClusterError

# squeue's states in which a job still holds, or waits for, an allocation.
LIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"})


@dataclass(frozen=True)
class JobState:
    state: str  # SLURM's job_state, e.g. PENDING, RUNNING, FAILED, CANCELLED, NODE_FAIL, TIMEOUT
    reason: str  # SLURM's state_reason, e.g. Resources, Priority, PartitionDown, None


@dataclass(frozen=True)
class SbatchOptions:
    """The allocation one batch job asks for; None leaves SLURM's default."""

    name: str
    nodes: int = 1
    partition: str | None = None
    cpus_per_node: int | None = None
    gpus_per_node: int = 0
    mem: str | None = None
    time: str | None = None
    account: str | None = None
    array: str | None = None
    dependency: str | None = None
    requeue: bool = False
    comment: str | None = None

    def args(self, log: Path) -> list[str]:
        out = [f"--job-name={self.name}", f"--nodes={self.nodes}", "--ntasks-per-node=1", f"--output={log}"]
        optional = {
            "--partition": self.partition,
            "--cpus-per-task": self.cpus_per_node,
            "--mem": self.mem,
            "--time": self.time,
            "--account": self.account,
            "--array": self.array,
            "--dependency": self.dependency,
            "--comment": self.comment,
        }
        out += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
        if self.gpus_per_node:
            out.append(f"--gpus-per-node={self.gpus_per_node}")
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
        """SLURM's state of each job it still knows (an array job: its worst live task)."""
        done = self._run(["squeue", "--json", "--states=all"])
        if done.returncode != 0:
            raise ClusterError(f"squeue failed: {_words(done.stderr)}")
        found: dict[str, JobState] = {}
        for job in json.loads(done.stdout).get("jobs", []):
            for key in (str(job.get("job_id")), str(job.get("array_job_id") or "")):
                if key in job_ids and (key not in found or found[key].state not in LIVE_STATES):
                    found[key] = JobState(str(job.get("job_state", "UNKNOWN")), str(job.get("state_reason", "")))
        return found

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            done = self._run(["scancel", *job_ids])
            if done.returncode != 0 and "Invalid job id" not in done.stderr:
                raise ClusterError(f"scancel {' '.join(job_ids)} failed: {_words(done.stderr)}")


def _words(stderr: str) -> str:
    """SLURM's own message without the `sbatch: error:` prefixes."""
    lines = [line.split("error:", 1)[-1].strip() for line in stderr.strip().splitlines() if line.strip()]
    return "; ".join(lines) or "no message"
