"""Airflow UI plugin."""
