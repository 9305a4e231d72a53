"""Role chaining (Apache Flink's operator chaining for agents): which roles share an actor process.

A hand-off between two actors costs a Ray call, a pickle of the message and, for a large one, an
object-store put; a hand-off between two roles of one process is a queue put. So consecutive roles
(in the pipeline's order) with the same resources and replica count run as one *chain*: one pool
of actors, each hosting every role of the chain with its own queue, workers, timeout and metrics.

A chain is cut before and after a role that needs its own resources: GPUs or custom Ray resources,
an in-process model or a sandbox session (`Role.own_process`), or `roles.<name>.chain: false` in
the spec. It is cut between two roles whose replica counts or CPU reservations differ, since one
actor pool cannot have two sizes. Cutting only changes where a role runs, never what it writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from matrix_provider.runtime.pipeline import Pipeline
from matrix_provider.runtime.spec import PipelineSpec, RoleSpec


@dataclass(frozen=True)
class Chain:
    """Roles that run together in each of `replicas` actors, with one role's resources."""

    roles: tuple[str, ...]
    replicas: int
    num_cpus: float
    num_gpus: float
    resources: tuple[tuple[str, float], ...]

    @property
    def name(self) -> str:
        """`filter`, or `score+question` for a chain: part of the actors' names."""
        return "+".join(self.roles)


def cut_reason(spec: PipelineSpec, pipeline: Pipeline, role: str) -> str | None:
    """Why `role` runs in actors of its own, or None when it may share them with its neighbours."""
    role_spec = spec.roles[role]
    if not role_spec.chain:
        return "chain: false in the spec"
    if role_spec.num_gpus > 0:
        return "needs GPUs"
    if role_spec.resources:
        return "needs custom resources"
    return pipeline.roles[role].own_process


def _joins(last: RoleSpec, role_spec: RoleSpec) -> bool:
    return (last.replicas, last.num_cpus) == (role_spec.replicas, role_spec.num_cpus)


def plan_chains(spec: PipelineSpec, pipeline: Pipeline) -> list[Chain]:
    """The run's chains, in the pipeline's role order; every role is in exactly one."""
    order = [r for r in pipeline.roles if r in spec.roles]
    groups: list[list[str]] = []
    for role in order:
        previous = groups[-1][-1] if groups else None
        if (
            previous is not None
            and cut_reason(spec, pipeline, role) is None
            and cut_reason(spec, pipeline, previous) is None
            and _joins(spec.roles[previous], spec.roles[role])
        ):
            groups[-1].append(role)
        else:
            groups.append([role])
    return [_chain(spec, group) for group in groups]


def _chain(spec: PipelineSpec, roles: Sequence[str]) -> Chain:
    first = spec.roles[roles[0]]
    return Chain(tuple(roles), first.replicas, first.num_cpus, first.num_gpus, tuple(sorted(first.resources.items())))
