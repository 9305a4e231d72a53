"""What roles use: a row's tool calls go to the pool its lease hashes to.

One lease per delivery of a row (`lease_of`), so a re-delivered row starts from a fresh sandbox
and never shares one with a stale delivery still running elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import ray
from ray.exceptions import RayActorError

from matrix_provider import names
from matrix_provider.sandbox.pool import SandboxPool

if TYPE_CHECKING:
    from matrix_provider.runtime.orchestrator import Orchestrator

T = TypeVar("T")
_TRIES = 20  # a pool actor being restarted answers again within a few seconds


def lease_of(msg: Orchestrator) -> str:
    return f"{msg.key or msg.id}#{msg.delivery}"


def pool_index(lease: str, pools: int) -> int:
    """Stable across processes (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(lease.encode(), digest_size=8).digest(), "big") % pools


class SandboxClient:
    """Calls SandboxPool objects in this process, Ray actor handles of them, or named pool actors."""

    lease_of = staticmethod(lease_of)

    def __init__(self, pools: Sequence[Any]):
        if not pools:
            raise ValueError("a SandboxClient needs at least one pool")
        self._pools: list[Any] = list(pools)
        self._names: list[str] = []

    @classmethod
    def named(cls, run_id: str, count: int) -> SandboxClient:
        """The pool actors of a run, looked up by name when first used."""
        client = cls([None] * count)
        client._names = [names.sandbox_name(run_id, i) for i in range(count)]
        return client

    async def call(
        self,
        msg: Orchestrator,
        host: str,
        init: dict[str, Any],
        name: str,
        arguments: dict[str, Any],
        requestor: str,
        history: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """Run a tool in the row's sandbox -> {"content": str, "error": bool} (see SandboxPool.call)."""
        lease = lease_of(msg)
        return await self._invoke(lease, "call", lease, host, init, name, arguments, requestor, history)

    async def release(self, msg: Orchestrator) -> None:
        lease = lease_of(msg)
        await self._invoke(lease, "release", lease)

    async def _invoke(self, lease: str, method: str, *args: Any) -> Any:
        """Call the lease's pool; a pool actor that is restarting is retried (calls replay history, so a
        call lost with the old pool is safe to repeat)."""
        index = pool_index(lease, len(self._pools))
        if self._pools[index] is None:
            name = self._names[index]

            async def lookup() -> Any:  # ValueError: no actor of that name (yet)
                return ray.get_actor(name, namespace=names.NAMESPACE)

            self._pools[index] = await _retry(lookup, ValueError)
        pool = self._pools[index]
        if isinstance(pool, SandboxPool):
            return await getattr(pool, method)(*args)
        return await _retry(lambda: getattr(pool, method).remote(*args), RayActorError)


async def _retry(attempt: Callable[[], Awaitable[T]], retryable: type[Exception]) -> T:
    tries = 0
    while True:
        try:
            return await attempt()
        except retryable:
            tries += 1
            if tries == _TRIES:
                raise
            await asyncio.sleep(min(0.1 * tries, 1.0))
