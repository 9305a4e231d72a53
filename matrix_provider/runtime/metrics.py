"""Ray metrics (exported to Prometheus by every Ray node's metrics agent).

Per role: queue length, in flight, processed, errors, step latency, tokens.
Per pipeline: rows done by status, prompt and completion tokens, rows in flight, redeliveries,
units and parts committed. Ray exports each with a `ray_` prefix. Every counter series whose labels
are known up front starts at zero when its actor starts: Prometheus' `rate()` needs a sample before
the first increment, so a role whose whole share of a run falls between two scrapes would otherwise
show no rate at all. The shipped dashboards (`monitoring/dashboards/`) query these.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from matrix_provider.runtime.orchestrator import ERROR, FILTERED, OK

TOKEN_KINDS = ("prompt", "completion")
_LATENCY_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]


def _start_at_zero(counter: Counter, tags: dict[str, str] | None = None) -> None:
    """Export the series at 0 before its first increment.

    `Counter.inc` refuses 0, so this records through the method `inc` itself calls.
    """
    counter._record(0, tags)


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
        for counter in (self.processed, self.errors, self.retries):
            _start_at_zero(counter)
        for kind in TOKEN_KINDS:
            _start_at_zero(self.tokens, {"kind": kind})


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
        counters = (
            self.prompt_tokens,
            self.completion_tokens,
            self.redelivered,
            self.units_committed,
            self.parts_committed,
        )
        for metric in (self.rows, *counters, self.in_flight):
            metric.set_default_tags({"pipeline": pipeline})
        for counter in counters:
            _start_at_zero(counter)
        for status in (OK, FILTERED, ERROR):
            _start_at_zero(self.rows, {"status": status})
