"""Airflow operators."""

from matrix_provider.operators.pipeline import MatrixPipelineOperator

__all__ = ["MatrixPipelineOperator"]
