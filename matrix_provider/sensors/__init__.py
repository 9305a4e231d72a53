"""Airflow sensors."""

from matrix_provider.sensors.ray_job import MatrixRayJobSensor

__all__ = ["MatrixRayJobSensor"]
