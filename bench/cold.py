"""Every runner started cold, in a Python process of its own, so start-up is counted alike.

The benchmark process holds the Ray cluster, the simulators and the sampler; each measured run is
`python bench/cold.py ARGS OUT` (a runner of bench/runners.py and its arguments, pickled), which
imports what that runner imports, joins the cluster only if the runner uses Ray (p2p's drivers and
agents, Ray Data's actors), runs, and pickles its rows to OUT. A runner's start-up is then the
time from this process's start to its first LLM request, as a user's job would see it: imports,
joining Ray, starting actors or processes, reading the input.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
USES_RAY = {"p2p", "ray_data", "ray_data_fused", "ray_data_llm"}


def launch(runner: str, kwargs: dict[str, Any], work: Path, ray_address: str) -> tuple[Any, float]:
    """Run `runner` cold; (its rows, seconds from the process's start to its end)."""
    args, out = work / f"cold-{uuid.uuid4().hex[:8]}.pkl", work / f"cold-{uuid.uuid4().hex[:8]}.out"
    args.write_bytes(pickle.dumps((runner, kwargs)))
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, __file__, str(args), str(out)], env=env, cwd=work, timeout=1800)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"cold runner {runner} failed with exit code {done.returncode}")
    return pickle.loads(out.read_bytes()), wall


def main() -> None:
    args, out = Path(sys.argv[1]), Path(sys.argv[2])
    runner, kwargs = pickle.loads(args.read_bytes())
    sys.path.insert(0, str(ROOT))
    if runner in USES_RAY:
        import ray

        from matrix_provider.names import NAMESPACE

        ray.init(namespace=NAMESPACE, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    from bench import runners

    rows, _ = getattr(runners, f"run_{runner}")(**kwargs)
    out.write_bytes(pickle.dumps(rows))


if __name__ == "__main__":
    main()
