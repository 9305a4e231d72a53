"""tau2-bench tool-use trajectories on its real domains, with tau2's own reward (the `tau2` pipeline).

`task_file` writes one row per (domain, task, trial) to `<output_root>/tasks/<run>.jsonl`; the Ray
job then runs the user simulator, the assistant, the sandboxed tools and tau2's evaluator over them
into `<output_root>/runs/<run>/`. Its manifest's `summary` holds the mean reward per domain, pass^1
and the tool-call error rate (returned as the task's XCom).

The task-file step imports tau2, so the worker that runs it needs `matrix-provider[tau2]`
(the pipeline step itself only talks to Ray). For real quality point `llm` at a served model, e.g.
`vllm` with `llm.model=Qwen/Qwen2.5-7B-Instruct` on a GPU cluster; `sim` checks the plumbing only.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task

from matrix_provider.operators import MatrixPipelineOperator

with DAG(
    dag_id="matrix_tau2",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["matrix", "tau2", "agents"],
    params={
        "output_root": Param(os.environ.get("MATRIX_TAU2_ROOT", "s3://evals/tau2"), type="string"),
        "domains": Param("airline,retail", type="string", description="comma-separated tau2 domains"),
        "trials": Param(1, type="integer", minimum=1, description="trials per task (pass^k needs k)"),
        "llm": Param(os.environ.get("MATRIX_TAU2_LLM", "embedded"), type="string"),
        "max_steps": Param(200, type="integer", minimum=2),
        "concurrency": Param(32, type="integer", minimum=1),
    },
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
    doc_md=__doc__,
):

    @task
    def task_file(output_root: str, domains: str, trials: int, run_id: str) -> str:
        """Write the run's task rows and return their URI (the pipeline's input)."""
        from matrix_provider.pipelines.tau2 import write_task_file

        uri = f"{output_root.rstrip('/')}/tasks/{run_id}.jsonl"
        write_task_file(uri, [d.strip() for d in domains.split(",") if d.strip()], int(trials))
        return uri

    tasks = task_file("{{ params.output_root }}", "{{ params.domains }}", "{{ params.trials }}", "{{ run_id }}")
    MatrixPipelineOperator(
        task_id="trajectories",
        pipeline="tau2",
        input_uri=tasks,
        output_uri="{{ params.output_root }}/runs/{{ run_id }}/",
        concurrency="{{ params.concurrency }}",
        overrides={"llm": "{{ params.llm }}", "params.max_steps": "{{ params.max_steps }}"},
        deferrable=True,
        execution_timeout=timedelta(hours=12),
    )
