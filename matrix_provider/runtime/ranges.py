"""Sets of row indexes as sorted, disjoint `[start, end)` ranges: which rows of a unit a part holds.

Rows finish out of order, but they are admitted in input order, so the rows one part or one
unit's committed parts hold are a few long ranges, not one entry per row.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable


class RangeSet:
    def __init__(self, ranges: Iterable[Iterable[int]] = ()):
        merged: list[list[int]] = []
        for start, end in sorted((int(a), int(b)) for a, b in ranges):
            if start >= end:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.ranges = merged
        self._starts = [r[0] for r in merged]

    @classmethod
    def of(cls, indexes: Iterable[int]) -> RangeSet:
        return cls([i, i + 1] for i in indexes)

    def __contains__(self, index: int) -> bool:
        at = bisect.bisect_right(self._starts, index) - 1
        return at >= 0 and index < self.ranges[at][1]

    def __len__(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def intersects(self, other: RangeSet) -> bool:
        return any(other._overlaps(start, end) for start, end in self.ranges)

    def _overlaps(self, start: int, end: int) -> bool:
        at = bisect.bisect_left(self._starts, end) - 1
        return at >= 0 and self.ranges[at][1] > start

    def union(self, other: RangeSet) -> RangeSet:
        return RangeSet([*self.ranges, *other.ranges])

    def to_json(self) -> list[list[int]]:
        return [list(r) for r in self.ranges]
