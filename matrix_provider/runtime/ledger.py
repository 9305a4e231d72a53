"""The id ledger: one small actor that decides, for every input id, whether this run owns it.

Drivers claim ids in batches at admission (one call per batch, never in the agents' inner loop).
An id already committed by an earlier run is `resumed`; an id seen twice in the input is a
duplicate, whose later occurrence becomes an error row under its position id.
"""

from __future__ import annotations

from typing import Literal

import ray

Claim = Literal["new", "resumed", "duplicate", "duplicate_resumed"]


@ray.remote(num_cpus=0)
class IdLedger:
    def __init__(self, committed: list[str]):
        self.committed = set(committed)
        self.claimed: set[str] = set()

    def claim(self, pairs: list[tuple[str, str]]) -> list[Claim]:
        """For each (id, position id): who owns it."""
        out: list[Claim] = []
        for row_id, pos_id in pairs:
            if row_id in self.claimed:
                out.append("duplicate_resumed" if pos_id in self.committed else "duplicate")
                self.claimed.add(pos_id)
            elif row_id in self.committed:
                self.claimed.add(row_id)
                out.append("resumed")
            else:
                self.claimed.add(row_id)
                out.append("new")
        return out
