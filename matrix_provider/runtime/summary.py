"""A pipeline's manifest figures as mergeable aggregates, so no summary ever reads the rows back.

Each output row contributes a small dict of numbers (nested dicts allowed, e.g. per domain); a
part's contributions are summed into its part record, parts into the unit's commit record, and
units into the manifest, where the pipeline's `finish` turns the totals into its figures. The job's
memory then depends on the number of units, not of rows, for every pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Counts = dict[str, Any]  # str -> number | Counts


@dataclass(frozen=True)
class Summary:
    row: Callable[[dict[str, Any]], Counts]
    """One output row's contribution (any status; return {} to count nothing)."""
    finish: Callable[[Counts], dict[str, Any]]
    """The manifest's `summary` from the totals of every committed row."""
    columns: tuple[str, ...] = ()
    """The pipeline's columns `row` reads (besides `status`); only these are decoded for it."""


def add_counts(total: Counts, part: Counts) -> Counts:
    """`total` plus `part`, key by key, recursively; in place, returns `total`."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def sum_counts(parts: Iterable[Counts]) -> Counts:
    total: Counts = {}
    for part in parts:
        add_counts(total, part)
    return total
