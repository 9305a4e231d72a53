"""Ray clusters started by a batch scheduler (SLURM) or on this machine (`--local`).

Neither runtime nor Airflow: stdlib and httpx only, so the `matrix cluster` command and the
Airflow setup/teardown operators share it without the Airflow side importing the runtime.
"""
