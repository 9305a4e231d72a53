"""One measured 3-node point: p2p on a real 3-node Ray cluster on this machine.

A head and two worker nodes (`ray start`, each its own raylet and object store; tests/multinode.py
starts them), the simulator on one of them, natural_reasoning with a partition driver and a replica
of its one chain per node (SPREAD places one on each), so two rows in three hand off across nodes.
The nodes share this machine's cores, which the model is told (`bench/model.py`, `three_nodes`).

The measuring runs in a process of its own joined to that cluster (`python bench/three_nodes.py OUT
ROWS IN_FLIGHT`): the benchmark process is a driver of its own local Ray and cannot join a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NODES = 3


def measure(work: Path, rows: int, in_flight: int) -> dict[str, Any]:
    """Start the cluster, measure in a process joined to it, end the cluster; the figures."""
    sys.path.insert(0, str(ROOT))
    from tests.multinode import multinode_cluster

    work.mkdir(parents=True, exist_ok=True)
    out = work / "three-nodes.json"
    with multinode_cluster(work / "cluster", workers=NODES - 1, num_cpus=2) as cluster:
        env = {**cluster.env, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, __file__, str(out), str(rows), str(in_flight), str(work)]
        subprocess.run(command, env=env, cwd=cluster.workdir, check=True, timeout=1800)
    return json.loads(out.read_text())


def _inner(out: Path, rows: int, in_flight: int, work: Path) -> None:
    import ray

    from bench import runners, workload
    from bench.run import BACKEND
    from bench.sampling import Sampler
    from matrix_provider.llm.sim_server import deploy_sim
    from matrix_provider.names import NAMESPACE
    from matrix_provider.runtime.spec import compose

    ray.init(namespace=NAMESPACE, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    wl = workload.NATURAL_REASONING
    sim = workload.sim_spec(BACKEND["slots"], 0.0, 1, BACKEND["output_mean"], model=BACKEND["model"])
    overrides = workload.overrides(sim, wl)
    deploy_sim(compose(wl.spec, overrides, {"input": "-", "output": "-"}).llm, "matrix-sim-three-nodes")
    corpus = workload.write_corpus(work / "in", rows)
    replicas = tuple(f"roles.{r}.replicas={NODES}" for r in wl.stages)
    with Sampler("matrix-sim-three-nodes", 1, in_flight / rows, probes=1) as sampler:
        got, wall = runners.run_p2p(wl, corpus, work / "out", overrides, NODES, in_flight // NODES, replicas)
    figures = {
        "nodes": len([n for n in ray.nodes() if n["Alive"]]),
        "rows": len(got),
        "rows_in_flight": in_flight,
        "wall_s": round(wall, 2),
        **sampler.utilization(),
        "calls_per_s": sampler.calls_per_s(),
    }
    figures.pop("utilization_trace")
    out.write_text(json.dumps(figures))
    ray.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _inner(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
