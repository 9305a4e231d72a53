"""Pipelines that exist only to put the runtime in a corner (imported by Ray workers via PYTHONPATH)."""
