"""How a sandbox worker is launched: the argv and environment of each backend.

- `bwrap`: bubblewrap on this host. Every namespace unshared (no network at all), the whole file
  system read-only, a private tmpfs on /tmp as the only writable place (and the working directory),
  no capabilities even when run as root, the sandbox killed with its parent.
- `apptainer`: one `apptainer exec` per worker (a process the pool can kill, unlike a daemonized
  instance), contained, no home, no network; the image must hold python, matrix_provider and the
  tool host's package.
- `none`: a plain subprocess with the pool's file system and network. Unsafe: for debugging only.

All backends get a clean environment (no credentials of the agent process) and the worker sets its
own CPU-time and address-space limits before any host code runs.
"""

from __future__ import annotations

import os
import shutil
import sys

from matrix_provider.errors import SpecError
from matrix_provider.sandbox.spec import SandboxSpec

WORKER_MODULE = "matrix_provider.sandbox.worker"
SCRATCH = "/tmp"
BWRAP = [
    "bwrap",
    "--unshare-all",
    "--die-with-parent",
    "--new-session",
    "--cap-drop",
    "ALL",
    "--ro-bind",
    "/",
    "/",
    "--dev",
    "/dev",
    "--proc",
    "/proc",
    "--tmpfs",
    SCRATCH,
    "--chdir",
    SCRATCH,
]
# What a tool process sees: scratch as home and temp, one thread per numeric library (a sandbox
# is one tool process; per-thread buffers would eat its address-space limit).
SANDBOX_ENV = {
    "HOME": SCRATCH,
    "TMPDIR": SCRATCH,
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def worker_args(spec: SandboxSpec, factory: str) -> list[str]:
    return ["-m", WORKER_MODULE, f"--cpu-seconds={spec.cpu_seconds}", f"--memory-mb={spec.memory_mb}", factory]


def command(spec: SandboxSpec, factory: str) -> list[str]:
    """The argv that starts one sandboxed worker for host `factory`."""
    if spec.backend == "bwrap":
        return [*BWRAP, *_unhide_under_scratch(), sys.executable, *worker_args(spec, factory)]
    if spec.backend == "apptainer":
        assert spec.image is not None  # SandboxSpec requires it
        env = [f"--env={key}={value}" for key, value in SANDBOX_ENV.items()]
        return [
            "apptainer",
            "exec",
            "--containall",
            "--no-home",
            "--net",
            "--network",
            "none",
            f"--pwd={SCRATCH}",
            *env,
            spec.image,
            "python",
            *worker_args(spec, factory),
        ]
    return [sys.executable, *worker_args(spec, factory)]


def _unhide_under_scratch() -> list[str]:
    """Read-only binds of our interpreter and import path where they live under the scratch
    directory (a checkout or venv in /tmp), which the scratch tmpfs would otherwise hide."""
    binds: list[str] = []
    for path in sorted({os.path.abspath(p) for p in [sys.prefix, *sys.path] if p}):
        if (path == SCRATCH or path.startswith(SCRATCH + "/")) and os.path.exists(path):
            binds += ["--ro-bind", path, path]
    return binds


def environment(spec: SandboxSpec) -> dict[str, str]:
    """The environment of the launched process.

    bwrap and none run this host's interpreter: it gets our import path (absolute, since its working
    directory differs) and nothing else of ours. apptainer itself needs our environment (its cache,
    its config) and `--containall` keeps that out of the container, which gets SANDBOX_ENV by --env.
    """
    if spec.backend == "apptainer":
        return dict(os.environ)
    path = os.pathsep.join(os.path.abspath(p) for p in sys.path)
    return {**SANDBOX_ENV, "PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": path}


def require(spec: SandboxSpec) -> None:
    """Fail before a run starts when the backend's command is missing on this host."""
    program = command(spec, "any.module:factory")[0]
    if shutil.which(program) is None:
        raise SpecError(
            f"sandbox.backend={spec.backend} needs {program!r} on PATH"
            + (" (Debian/Ubuntu: apt-get install bubblewrap)" if spec.backend == "bwrap" else "")
        )
