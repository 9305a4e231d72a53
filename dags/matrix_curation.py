"""Scheduled web-data curation over dated corpus snapshots (natural_reasoning), backfill-ready.

Each logical date reads `<corpus_root>/<ds>/` and writes `<output_root>/<ds>/`, so
`airflow backfill create --dag-id matrix_curation --from-date … --to-date …` curates every snapshot
in range, one Ray job per date. Rerunning a date resumes its output instead of recomputing it.
Defaults come from the environment so one file serves every deployment.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param

from matrix_provider.operators import MatrixPipelineOperator

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
        "partitions": Param(int(os.environ.get("MATRIX_CURATION_PARTITIONS", "4")), type="integer"),
    },
    doc_md=__doc__,
):
    MatrixPipelineOperator(
        task_id="curate",
        pipeline="natural_reasoning",
        input_uri="{{ params.corpus_root }}/{{ ds }}/",
        output_uri="{{ params.output_root }}/{{ ds }}/",
        partitions=4,
        concurrency=64,
        overrides={"llm": "{{ params.llm }}"},
        retries=int(os.environ.get("MATRIX_CURATION_RETRIES", "2")),
    )
