"""The Ray-side runtime: orchestrator messages, stateless agents, partition drivers, sources and sink.

Nothing in here imports Airflow.
"""
