"""A Ray cluster on SLURM for one DAG run: a setup task brings it up, a teardown task always ends it.

    up = MatrixSlurmClusterOperator(task_id="cluster_up", nodes=4, gpus_per_node=8, partition="gpu")
    run = MatrixPipelineOperator(task_id="curate", cluster=up.output, ...)
    down = MatrixSlurmClusterTeardownOperator(task_id="cluster_down", cluster=up.output)
    up >> run >> down.as_teardown(setups=up)

The setup task's XCom holds the cluster's addresses and the path of its token file (on the
filesystem the Airflow worker and the nodes share), never the token. Each DAG run gets its own
cluster (named after the run, so two runs never share or cancel each other's). The SLURM jobs
carry the run in their comment (`airflow:<dag>/<run>/<task>`) for anyone auditing `squeue`.
The setup task cancels what it submitted when it fails or is killed; the teardown cancels every
job the cluster has, whatever state the tasks before it ended in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

from matrix_provider.clusters import cluster as clusters
from matrix_provider.clusters.errors import ClusterError
from matrix_provider.clusters.slurm import Allocation, Slurm
from matrix_provider.operators.outcome import AirflowException


def _run_cluster_name(context: Any, prefix: str) -> str:
    ti = context["ti"]
    key = f"{ti.dag_id}/{ti.run_id}/{ti.map_index}"
    return f"{prefix}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


class MatrixSlurmClusterOperator(BaseOperator):
    """Submit a Ray cluster as SLURM batch jobs and wait until every node joined; returns its addresses.

    :param nodes: nodes (one head job, and a requeued worker array for the rest).
    :param partition, account, time, mem: SLURM's allocation options (SLURM's syntax). Templated.
    :param cpus_per_node, gpus_per_node: per node; also what each Ray node offers.
    :param name_prefix: cluster names are ``<prefix>-<hash of dag, run, map index>``.
    :param state_root: where cluster state directories go (on a filesystem the nodes share).
    :param ray_command: the `ray` the nodes run (default: beside the worker's Python, else on PATH).
    :param wait_s: how long to wait for every node; then the jobs are cancelled and the task fails.
    :param export_env: environment variables of the worker the nodes get (e.g. ``["AWS_PROFILE"]``);
        only PATH, HOME, LANG and TZ otherwise: never the Airflow worker's whole environment.

    SLURM's CLI runs with the worker's environment (PATH, ``SLURM_CONF``).
    """

    template_fields: Sequence[str] = ("partition", "account", "time", "mem", "state_root")
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        nodes: int = 1,
        partition: str | None = None,
        account: str | None = None,
        time: str | None = None,
        mem: str | None = None,
        cpus_per_node: int | None = None,
        gpus_per_node: int = 0,
        name_prefix: str = "matrix",
        state_root: str | None = None,
        ray_command: str | None = None,
        wait_s: float = 1800.0,
        export_env: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.nodes = nodes
        self.partition = partition
        self.account = account
        self.time = time
        self.mem = mem
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        self.name_prefix = name_prefix
        self.state_root = state_root
        self.ray_command = ray_command
        self.wait_s = wait_s
        self.export_env = tuple(export_env)
        self._name: str | None = None
        self._state_dir: Path | None = None
        # Made in execute: a threading.Event cannot be deep-copied, and Airflow copies operators
        # (dag.partial_subset() for a clear with downstream, task mapping).
        self._stop: threading.Event | None = None

    def execute(self, context: Any) -> dict[str, Any]:
        self._stop = threading.Event()
        name = self._name = _run_cluster_name(context, self.name_prefix)
        root = Path(self.state_root) if self.state_root else clusters.state_root()
        self._state_dir = root / name
        ti = context["ti"]
        try:
            wanted = {f.name: getattr(self, f.name) for f in dataclasses.fields(Allocation) if f.name != "comment"}
            spec = clusters.ClusterSpec(
                name=name,
                nodes=self.nodes,
                allocation=Allocation(**wanted, comment=f"airflow:{ti.dag_id}/{ti.run_id}/{ti.task_id}"),
                export=self.export_env,
                state_dir=str(self._state_dir),
                ray=self.ray_command,
            )
            # A retry of this setup replaces what an earlier try of the same run left up.
            info = clusters.up(spec, self.wait_s, log=self.log.info, replace=True, stop=self._stop)
        except ClusterError as exc:
            raise AirflowException(str(exc)) from None
        self.log.info("Ray cluster %s up: dashboard %s, jobs %s", name, info.dashboard_url, ", ".join(info.jobs))
        return dataclasses.asdict(info)

    def on_kill(self) -> None:
        """A killed setup (task or run marked failed, timeout) cancels whatever it had submitted, also
        a job sbatch had accepted but `up` had not yet recorded (by name); `up` stops submitting."""
        if self._stop is not None:
            self._stop.set()
        if not self._name:
            return
        with contextlib.suppress(ClusterError):
            if self._state_dir and (self._state_dir / "cluster.json").exists():
                clusters.down(self._state_dir, wait_s=10)
            else:
                Slurm().cancel_named(clusters.job_names(self._name))


class MatrixSlurmClusterTeardownOperator(BaseOperator):
    """Cancel every SLURM job of the cluster a setup task brought up and wait until SLURM lists none.

    :param cluster: the setup task's XCom (``MatrixSlurmClusterOperator(...).output``). Templated.
    """

    template_fields: Sequence[str] = ("cluster",)
    ui_color = "#fde8e8"

    def __init__(self, *, cluster: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cluster = cluster

    def execute(self, context: Any) -> list[str]:
        if not self.cluster:  # the setup failed before handing anything on, and cancelled its own jobs
            self.log.info("no cluster was handed on: nothing to tear down")
            return []
        try:
            jobs = clusters.down(Path(self.cluster["state_dir"]))
        except ClusterError as exc:
            raise AirflowException(str(exc)) from None
        self.log.info("cancelled the jobs %s of cluster %s", ", ".join(jobs), self.cluster.get("name"))
        return jobs
