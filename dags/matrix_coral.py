"""Collaborative reasoning (coral) over a question set, with a quality gate on its agreement figures.

`discuss` runs the `coral` pipeline: two agents of the same model discuss each question until
they agree or reach `max_turns`, and each row records both final answers, whether they agree and
whether they agree on the gold answer. The run's manifest (the task's XCom) carries the
pipeline's summary: `agreement_rate`, `agreement_correctness`, `consensus_rate`, `mean_turns`.
`quality_gate` fails the DAG run when agreement-correctness is below `min_correctness`, so a
model or prompt change that makes the agents agree on wrong answers is caught before the
conversations are used as training data.

The default questions are the 100 GSM8K test problems shipped with the provider
(`matrix_provider/data/coral/questions.jsonl`), found beside this Airflow's install: set
`MATRIX_CORAL_QUESTIONS` (e.g. an `s3://` URI) when the Ray cluster does not share it. For real
quality figures run it on a GPU backend (`llm=vllm` with `llm.model=...`); `embedded` is a
135M-parameter model that rarely gets a GSM8K problem right.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param, task

import matrix_provider
from matrix_provider.operators import MatrixPipelineOperator

BUNDLED = Path(matrix_provider.__file__).parent / "data" / "coral" / "questions.jsonl"

with DAG(
    dag_id="matrix_coral",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["matrix", "coral"],
    params={
        "questions": Param(os.environ.get("MATRIX_CORAL_QUESTIONS", str(BUNDLED)), type="string"),
        "output_root": Param(os.environ.get("MATRIX_CORAL_OUTPUT_ROOT", "s3://curated/coral"), type="string"),
        "llm": Param(os.environ.get("MATRIX_CORAL_LLM", "embedded"), type="string"),
        "max_turns": Param(6, type="integer", minimum=2),
        "min_correctness": Param(0.0, type="number", minimum=0, maximum=1),
    },
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2)},
    doc_md=__doc__,
):
    discuss = MatrixPipelineOperator(
        task_id="discuss",
        pipeline="coral",
        input_uri="{{ params.questions }}",
        output_uri="{{ params.output_root }}/{{ run_id | replace(':', '_') }}/",
        concurrency=32,
        overrides={"llm": "{{ params.llm }}", "params.max_turns": "{{ params.max_turns }}"},
        deferrable=True,  # a long Ray job: wait in the triggerer, not in a worker slot
        pool=os.environ.get("MATRIX_GPU_POOL", "matrix_gpu"),
        execution_timeout=timedelta(hours=6),
    )

    @task
    def quality_gate(manifest: dict, min_correctness: str) -> dict:
        """The run's coral figures; fails when the agents agree on the gold answer too rarely."""
        summary = manifest["summary"]
        correctness = summary["agreement_correctness"]
        if correctness is None or correctness < float(min_correctness):
            raise ValueError(f"agreement_correctness below {min_correctness}: {summary}")
        return summary

    quality_gate(discuss.output, "{{ params.min_correctness }}")
