"""What decides a dedup's kept set. Defaults are datatrove 0.10.1's `MinhashConfig`, read from it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from datatrove.pipeline.dedup.minhash import MinhashConfig

_DATATROVE = MinhashConfig()


@dataclasses.dataclass(frozen=True)
class DedupParams:
    """Field by field the kept set's inputs: a change to any of them is a different output."""

    text_field: str = "text"
    id_field: str = "id"
    exact: bool = True
    near: bool = True
    n_grams: int = _DATATROVE.n_grams
    num_buckets: int = _DATATROVE.num_buckets
    hashes_per_bucket: int = _DATATROVE.hashes_per_bucket
    seed: int = _DATATROVE.seed

    def __post_init__(self) -> None:
        for name in ("n_grams", "num_buckets", "hashes_per_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.exact or self.near):
            raise ValueError("nothing to do: both exact and near-duplicate removal are off")
        for name in ("text_field", "id_field"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")

    @property
    def num_perm(self) -> int:
        return self.num_buckets * self.hashes_per_bucket

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]
