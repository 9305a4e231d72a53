"""A team DAG: two curation configs over one snapshot, each fanned out over its shards with mapping.

`list_shards` finds the snapshot's shard folders; each config's MatrixPipelineOperator is mapped
over them (one Ray job per shard, each with its own output; at most two at once per run so one
DAG run cannot take the whole GPU pool), then a summary task adds up the manifests that the mapped
tasks returned. Every mapped task emits an event on its config's asset.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, task

from matrix_provider.operators import MatrixPipelineOperator

SNAPSHOT = os.environ.get("MATRIX_TEAM_SNAPSHOT", "s3://corpora/dclm/2026-01-01")
OUTPUT = os.environ.get("MATRIX_TEAM_OUTPUT", "s3://team-curated")
LLM = os.environ.get("MATRIX_TEAM_LLM", "embedded")

with DAG(
    dag_id="matrix_team_pipelines",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    tags=["matrix", "team"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2)},
    doc_md=__doc__,
):

    @task
    def list_shards(snapshot: str) -> list[str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(snapshot)
        protocol = snapshot.split("://")[0] + "://" if "://" in snapshot else ""
        shards = sorted(protocol + p for p in fs.ls(root, detail=False) if fs.isdir(p))
        if not shards:
            raise ValueError(f"no shard folders under {snapshot}")
        return shards

    shards = list_shards(SNAPSHOT)

    configs = {
        "strict": {"llm": LLM, "params.min_cues_per_1000_words": 30},
        "lenient": {"llm": LLM, "params.min_cues_per_1000_words": 12},
    }
    runs = []
    for name, overrides in configs.items():
        runs.append(
            MatrixPipelineOperator.partial(
                task_id=f"curate_{name}",
                pipeline="natural_reasoning",
                output_uri=f"{OUTPUT}/{name}/{{{{ run_id | replace(':', '_') }}}}/{{{{ ti.map_index }}}}",
                overrides=overrides,
                partitions=1,
                concurrency=32,
                max_active_tis_per_dagrun=2,
                deferrable=True,  # hours of Ray job: wait in the triggerer, not in a worker slot
                pool=os.environ.get("MATRIX_GPU_POOL", "matrix_gpu"),
                execution_timeout=timedelta(hours=6),
            ).expand(input_uri=shards)
        )

    @task
    def summarize(strict: list[dict], lenient: list[dict]) -> dict[str, dict[str, int]]:
        keys = ("rows_in", "rows_ok", "rows_filtered", "rows_error")
        return {
            name: {k: sum(m[k] for m in manifests) for k in keys}
            for name, manifests in (("strict", strict), ("lenient", lenient))
        }

    summarize(*(run.output for run in runs))
