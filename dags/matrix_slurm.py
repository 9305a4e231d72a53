"""Curation on a Ray cluster that SLURM starts for this DAG run, and that is always cancelled after.

`cluster_up` submits the cluster as SLURM batch jobs (a head, and a requeued worker array for more
nodes) and waits until every node joined; `curate` runs the pipeline on it, finding the cluster
through `cluster_up`'s XCom (addresses and the token file's path, never the token), not through a
pre-made connection; `cluster_down` is a teardown: it cancels the jobs whatever became of `curate`.
If the allocation ends under a running job (scancel, preemption, time limit), `curate` fails at
once with SLURM's account of it.

The Airflow worker needs SLURM's CLI (a login node, or `SLURM_CONF`), a filesystem shared with
the nodes for the cluster's state (`MATRIX_CLUSTER_DIR`), and matrix-provider[runtime] on the nodes.
"""

from __future__ import annotations

import json
import os

import pendulum
from airflow.sdk import DAG, Param

from matrix_provider.operators import (
    MatrixPipelineOperator,
    MatrixSlurmClusterOperator,
    MatrixSlurmClusterTeardownOperator,
)

with DAG(
    dag_id="matrix_slurm_curation",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    tags=["matrix", "slurm"],
    params={
        "input": Param(os.environ.get("MATRIX_SLURM_INPUT", "s3://corpora/dclm/latest"), type="string"),
        "output": Param(os.environ.get("MATRIX_SLURM_OUTPUT", "s3://curated/slurm"), type="string"),
    },
    doc_md=__doc__,
):
    up = MatrixSlurmClusterOperator(
        task_id="cluster_up",
        nodes=int(os.environ.get("MATRIX_SLURM_NODES", "2")),
        partition=os.environ.get("MATRIX_SLURM_PARTITION") or None,
        cpus_per_node=int(os.environ.get("MATRIX_SLURM_CPUS", "0")) or None,
        gpus_per_node=int(os.environ.get("MATRIX_SLURM_GPUS", "0")),
        time=os.environ.get("MATRIX_SLURM_TIME", "12:00:00"),
        wait_s=float(os.environ.get("MATRIX_SLURM_WAIT_S", "1800")),
    )
    curate = MatrixPipelineOperator(
        task_id="curate",
        pipeline=os.environ.get("MATRIX_SLURM_PIPELINE", "natural_reasoning"),
        input_uri="{{ params.input }}",
        output_uri="{{ params.output }}/{{ run_id | replace(':', '_') }}",
        cluster=up.output,
        overrides=json.loads(os.environ.get("MATRIX_SLURM_OVERRIDES", "{}")),
        deferrable=os.environ.get("MATRIX_SLURM_DEFERRABLE", "1") == "1",
        poll_interval=2,
    )
    down = MatrixSlurmClusterTeardownOperator(task_id="cluster_down", cluster=up.output)
    up >> curate >> down.as_teardown(setups=up)
