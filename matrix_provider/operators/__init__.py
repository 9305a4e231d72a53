"""Airflow operators."""

from matrix_provider.operators.dedup import MatrixDedupOperator
from matrix_provider.operators.pipeline import MatrixPipelineOperator
from matrix_provider.operators.slurm_cluster import MatrixSlurmClusterOperator, MatrixSlurmClusterTeardownOperator
from matrix_provider.operators.stop import MatrixStopJobOperator

__all__ = [
    "MatrixDedupOperator",
    "MatrixPipelineOperator",
    "MatrixSlurmClusterOperator",
    "MatrixSlurmClusterTeardownOperator",
    "MatrixStopJobOperator",
]
