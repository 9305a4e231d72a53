"""Ray metrics (exported to Prometheus by every Ray node's metrics agent).

Per role: queue length, in flight, processed, errors, step latency, tokens.
Per pipeline: rows done by status, prompt and completion tokens, rows in flight, redeliveries,
units and parts committed. Ray exports each with a `ray_` prefix; a counter appears in a scrape
from its first increment on. The shipped dashboards (`monitoring/dashboards/`) query these.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]


class RoleMetrics:
    def __init__(self, pipeline: str, role: str):
        tags = {"pipeline": pipeline, "role": role}
        keys = ("pipeline", "role")
        self.queue = Gauge("matrix_role_queue_length", "messages waiting in this replica's queue", keys)
        self.in_flight = Gauge("matrix_role_in_flight", "messages being worked on", keys)
        self.processed = Counter("matrix_role_processed_total", "steps finished", keys)
        self.errors = Counter("matrix_role_errors_total", "steps that failed for good", keys)
        self.retries = Counter("matrix_role_retries_total", "step attempts after a failure", keys)
        self.latency = Histogram("matrix_role_latency_seconds", "step latency", _LATENCY_BOUNDARIES, keys)
        self.tokens = Counter("matrix_role_tokens_total", "LLM tokens", (*keys, "kind"))
        for metric in (self.queue, self.in_flight, self.processed, self.errors, self.retries, self.latency):
            metric.set_default_tags(tags)
        self.tokens.set_default_tags(tags)


class PipelineMetrics:
    def __init__(self, pipeline: str):
        keys = ("pipeline",)
        self.rows = Counter("matrix_rows_total", "rows finished, by status", (*keys, "status"))
        self.prompt_tokens = Counter("matrix_prompt_tokens_total", "prompt tokens of finished rows", keys)
        self.completion_tokens = Counter("matrix_completion_tokens_total", "completion tokens of finished rows", keys)
        self.in_flight = Gauge("matrix_rows_in_flight", "rows admitted and not yet finished", (*keys, "partition"))
        self.redelivered = Counter("matrix_rows_redelivered_total", "rows delivered again after loss or deadline", keys)
        self.units_committed = Counter("matrix_units_committed_total", "input units committed to the output", keys)
        self.parts_committed = Counter("matrix_parts_committed_total", "Parquet parts of committed units", keys)
        counters = (self.rows, self.prompt_tokens, self.completion_tokens, self.redelivered)
        for metric in (*counters, self.units_committed, self.parts_committed, self.in_flight):
            metric.set_default_tags({"pipeline": pipeline})
