"""Scheduled web-data curation over dated corpus snapshots (natural_reasoning), backfill-ready.

Each run waits for `<corpus_root>/<date>/` to land (a sensor in reschedule mode: no worker slot
held while waiting), then reads it and writes `<output_root>/<date>/`, so
`airflow backfill create --dag-id matrix_curation --from-date … --to-date …` curates every snapshot
in range, one Ray job per date. The date is the run's logical date, or, for a manual run that has
none, the day it was triggered. Rerunning a date resumes its output instead of recomputing it.

Each run's output folder is added to the `matrix-curated-snapshots` asset alias (one asset per
date), so downstream DAGs can schedule on new curated snapshots. The Ray job takes a slot of the
`matrix_gpu` pool (create it with `airflow pools set matrix_gpu <GPUs> "GPU capacity"`) and is
stopped at `execution_timeout`. The Variable `matrix_llm_timeout_s` tunes the LLM client's timeout
without a code change (and a cleared run then runs anew, as its work changed).
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task

from matrix_provider.operators import MatrixPipelineOperator

DATE = "{{ (dag_run.logical_date or dag_run.run_after) | ds }}"

with DAG(
    dag_id="matrix_curation",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=3,
    tags=["matrix", "curation"],
    params={
        "corpus_root": Param(os.environ.get("MATRIX_CORPUS_ROOT", "s3://corpora/dclm"), type="string"),
        "output_root": Param(os.environ.get("MATRIX_OUTPUT_ROOT", "s3://curated/natural_reasoning"), type="string"),
        "llm": Param(os.environ.get("MATRIX_CURATION_LLM", "embedded"), type="string"),
        "partitions": Param(int(os.environ.get("MATRIX_CURATION_PARTITIONS", "4")), type="integer", minimum=1),
        "concurrency": Param(64, type="integer", minimum=1),
    },
    default_args={"retries": int(os.environ.get("MATRIX_CURATION_RETRIES", "2")), "retry_delay": timedelta(minutes=2)},
    doc_md=__doc__,
):

    @task.sensor(poke_interval=60, timeout=6 * 3600, mode="reschedule", retries=0)
    def snapshot_landed(corpus_root: str, date: str) -> bool:
        """The snapshot folder exists and holds at least one file."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(f"{corpus_root.rstrip('/')}/{date}")
        return fs.exists(root) and any(fs.find(root, maxdepth=3, withdirs=False))

    curate = MatrixPipelineOperator(
        task_id="curate",
        pipeline="natural_reasoning",
        input_uri="{{ params.corpus_root }}/" + DATE + "/",
        output_uri="{{ params.output_root }}/" + DATE + "/",
        partitions="{{ params.partitions }}",
        concurrency="{{ params.concurrency }}",
        overrides={
            "llm": "{{ params.llm }}",
            "llm.timeout_s": "{{ var.value.get('matrix_llm_timeout_s', '60') }}",
        },
        output_alias="matrix-curated-snapshots",
        deferrable=True,  # hours of Ray job: wait in the triggerer, not in a worker slot
        pool=os.environ.get("MATRIX_GPU_POOL", "matrix_gpu"),
        execution_timeout=timedelta(hours=12),
    )
    snapshot_landed("{{ params.corpus_root }}", DATE) >> curate
