"""Clusters on Ray Data: candidate pairs from shared keys, then connected components by star
contraction, with no state beyond one hash partition.

Every stage is a hash shuffle by a key column (`Dataset.repartition(keys=..., sort=True)`) followed
by `map_batches` over whole blocks, which is how Ray Data's own `groupby().map_groups()` sees
complete groups; here each block is handled with vectorized numpy instead of one call per group.

- Candidates: the documents filed under one key (a band, or the exact text) are linked to the
  smallest of them: edges (node, smallest), `node > smallest`.
- Components: the alternating large-star / small-star contraction of Kiveris et al., "Connected
  Components in MapReduce and Beyond" (SoCC 2014), O(log^2 n) rounds. A large-star step also tells
  whether its input was already a set of stars (every node either a root or one edge to it); when it
  was, each edge (a, b) names a removed document `a` and the kept smallest node `b` of its cluster.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import ray.data

MAX_ROUNDS = 64
_EDGES = pa.schema([pa.field("a", pa.int64()), pa.field("b", pa.int64())])


class NotConverged(RuntimeError):
    """The contraction did not settle within MAX_ROUNDS (it takes O(log^2 n) rounds)."""


def by_key(
    ds: ray.data.Dataset, keys: list[str], fn: Callable[[pa.Table], pa.Table], partitions: int
) -> ray.data.Dataset:
    """`fn` over whole hash partitions of `ds` by `keys`: every row of a key value reaches the same call."""
    return ds.repartition(partitions, keys=keys, sort=True).map_batches(fn, batch_size=None, batch_format="pyarrow")


def _starts(*columns: np.ndarray) -> np.ndarray:
    """True where a run of equal values (over all `columns`, sorted) begins."""
    new = np.ones(len(columns[0]), dtype=bool)
    if len(new):
        new[1:] = np.logical_or.reduce([c[1:] != c[:-1] for c in columns])
    return new


def _edges(a: np.ndarray, b: np.ndarray) -> pa.Table:
    return pa.table([pa.array(a, pa.int64()), pa.array(b, pa.int64())], schema=_EDGES)


def candidate_edges(block: pa.Table) -> pa.Table:
    """For each key: (node, smallest node) for every other node filed under it; `exact` marks exact keys."""
    hi, lo = block["hi"].to_numpy(), block["lo"].to_numpy()
    node, exact = block["node"].to_numpy(), block["exact"].to_numpy(zero_copy_only=False)
    order = np.lexsort((node, lo, hi))
    hi, lo, node, exact = hi[order], lo[order], node[order], exact[order]
    new = _starts(hi, lo)
    smallest = node[new][np.cumsum(new) - 1]
    linked = ~new
    return pa.table({"a": node[linked], "b": smallest[linked], "exact": exact[linked]})


def _sorted_unique(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    keep = _starts(a, b)
    return a[keep], b[keep]


def _both_ways(block: pa.Table) -> pa.Table:
    a, b = block["a"].to_numpy(), block["b"].to_numpy()
    return pa.table({"src": np.concatenate([a, b]), "dst": np.concatenate([b, a])})


def large_star(block: pa.Table) -> pa.Table:
    """Link every larger neighbour of a node to the smallest node of its neighbourhood. A node that is
    not yet a star's root or leaf (it has smaller and larger neighbours, or two smaller ones) is also
    written as a self-loop (n, n): their number says whether the contraction is done."""
    src, dst = _sorted_unique(block["src"].to_numpy(), block["dst"].to_numpy())
    new = _starts(src)
    group = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    smallest = np.minimum(src[first], dst[first])  # dst ascends within a node's group
    smaller = np.bincount(group, weights=dst < src, minlength=len(first))
    larger = np.bincount(group, weights=dst > src, minlength=len(first))
    unsettled = src[first][((smaller > 0) & (larger > 0)) | (smaller > 1)]
    up = dst > src
    return _edges(np.concatenate([dst[up], unsettled]), np.concatenate([smallest[group][up], unsettled]))


def small_star(block: pa.Table) -> pa.Table:
    """Link a node and all its smaller neighbours to the smallest of them."""
    a, b = block["a"].to_numpy(), block["b"].to_numpy()
    proper = a != b
    a, b = _sorted_unique(a[proper], b[proper])
    new = _starts(a)
    smallest = b[new][np.cumsum(new) - 1]
    moved = b != smallest
    return _edges(np.concatenate([a[new], b[moved]]), np.concatenate([b[new], smallest[moved]]))


def _has_loops(block: pa.Table) -> bool:
    """Read block by block where the blocks are (a materialized dataset), so no task is started."""
    return bool(np.any(block["a"].to_numpy() == block["b"].to_numpy()))


def components(edges: ray.data.Dataset, partitions: int) -> ray.data.Dataset:
    """The stars (leaf, root) of the graph `edges` (columns a > b): every root is its cluster's smallest node."""
    for _ in range(MAX_ROUNDS):
        stars = by_key(edges.map_batches(_both_ways, batch_format="pyarrow"), ["src"], large_star, partitions)
        stars = stars.materialize()
        if not any(_has_loops(block) for block in stars.iter_batches(batch_size=None, batch_format="pyarrow")):
            return stars
        edges = by_key(stars, ["a"], small_star, partitions).materialize()
    raise NotConverged(f"connected components did not settle in {MAX_ROUNDS} rounds")
