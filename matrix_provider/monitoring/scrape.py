"""Read one scrape of a Prometheus text endpoint (a Ray node's metrics export, vLLM's own `/metrics`).

The tests compare our manifest with the engine's own counters, and the benchmark reads vLLM's
prefix-cache queries and hits, from the same samples Prometheus would store.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(url: str, contains: str = "", timeout_s: float = 10.0) -> list[Sample]:
    """Every sample whose name contains `contains` (all when empty)."""
    text = httpx.get(url, timeout=timeout_s).text
    return [
        Sample(sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if contains in sample.name
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of one metric over every series whose labels include `labels` (replicas, engines)."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
