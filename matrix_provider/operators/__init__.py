"""Airflow operators."""

from matrix_provider.operators.pipeline import MatrixPipelineOperator
from matrix_provider.operators.stop import MatrixStopJobOperator

__all__ = ["MatrixPipelineOperator", "MatrixStopJobOperator"]
