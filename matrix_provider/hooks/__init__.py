"""Airflow hooks (talk to Ray over the Jobs REST API; import nothing from `runtime/`)."""
