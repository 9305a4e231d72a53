"""Ray metrics (exported to Prometheus by every Ray node's metrics agent).

Per role: queue length, in flight, processed, errors, step latency, tokens. A role's step figures
are summed in the actor and recorded every `flush` (each second, by the agent): a record crosses
into Ray's C++ metrics core, and four of them a step cost more than the hop itself.
Per pipeline: rows done by status, prompt and completion tokens, rows in flight, redeliveries,
units and parts committed. Ray exports each with a `ray_` prefix. Every counter series whose labels
are known up front starts at zero when its actor starts: Prometheus' `rate()` needs a sample before
the first increment, so a role whose whole share of a run falls between two scrapes would otherwise
show no rate at all. The shipped dashboards (`monitoring/dashboards/`) query these.
"""

from __future__ import annotations

from collections import Counter as Tally

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
    """One role's metrics in one actor; `step`, `retry` and `error` count locally until `flush`."""

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
        self._counts: Tally[str] = Tally()
        self._latencies: list[float] = []

    def step(self, latency_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        self._latencies.append(latency_s)
        self._counts["prompt"] += prompt_tokens
        self._counts["completion"] += completion_tokens

    def retry(self) -> None:
        self._counts["retries"] += 1

    def error(self) -> None:
        self._counts["errors"] += 1

    def flush(self, queued: int, running: int) -> None:
        """Record what was counted since the last flush, and the load gauges (Ray drops a gauge that
        is not set again within two export intervals, so a queue that holds still is set anyway)."""
        counts, latencies = self._counts, self._latencies
        self._counts, self._latencies = Tally(), []
        self.queue.set(queued)
        self.in_flight.set(running)
        if latencies:
            self.processed.inc(len(latencies))
        for latency in latencies:
            self.latency.observe(latency)
        for kind in TOKEN_KINDS:
            if counts[kind] > 0:
                self.tokens.inc(counts[kind], {"kind": kind})
        for name, counter in (("retries", self.retries), ("errors", self.errors)):
            if counts[name]:
                counter.inc(counts[name])


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
