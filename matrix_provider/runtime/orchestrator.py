"""The orchestrator: one message per input row carrying its data flow and its control flow.

Data: the input row, the conversation history, each role's results, token usage.
Control: which role acts next, which delivery this is, the row's deadline.
A pipeline subclasses `Orchestrator` and writes its routing in `route()`; agents call it after
each step and hand the message straight to a replica of the role it names.

Large payloads are offloaded: after a step, `offload()` puts any field whose pickled size is above
the threshold into Ray's object store and keeps only the reference; `materialize()` brings it back
on the next agent. Roles may change fields any way they like (setters or in place: `msg.row[k] = v`,
`msg.history.append(...)`): `offload()` compares the field's pickled bytes with the digest taken
when it was materialized and reuses the stored copy only when nothing changed, so no edit is lost.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from typing import Any

OK, FILTERED, ERROR = "ok", "filtered", "error"
PAYLOAD_FIELDS = ("row", "history", "results")


@dataclass
class Offloaded:
    """A payload that lives in the object store."""

    ref: Any  # ObjectRef of the pickled bytes
    nbytes: int
    digest: bytes


@dataclass
class Orchestrator:
    id: str  # the row's id (its id field, else its position in the input)
    partition: int  # index of the driver that admitted the row and takes its result
    delivery: int  # 1 for the first delivery, +1 for each re-delivery
    deadline: float  # wall-clock time (time.time()) after which agents drop this delivery
    row: Any
    history: Any = field(default_factory=list)
    results: Any = field(default_factory=dict)
    next_role: str | None = None
    status: str | None = None
    error: str | None = None
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    hops: int = 0
    key: str = ""  # the driver's handle of this row (unique per unit attempt and position)

    # -- routing (pipelines override) ---------------------------------------------------------
    def route(self, done: str | None) -> str | None:
        """Name the role that acts next, given the role that just finished (None at admission).

        Return None when the row is finished; set `status` with `finish()` first.
        """
        raise NotImplementedError

    def finish(self, status: str, error: str | None = None) -> None:
        self.status, self.error = status, error

    @property
    def done(self) -> bool:
        return self.status is not None

    # -- data -----------------------------------------------------------------------------------
    def set_result(self, role: str, value: Any) -> None:
        self._require_local("results")
        self.results[role] = value

    def add_turn(self, role: str, content: str, **extra: Any) -> None:
        self._require_local("history")
        self.history.append({"role": role, "content": content, **extra})

    def add_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.usage["prompt_tokens"] += prompt_tokens
        self.usage["completion_tokens"] += completion_tokens

    def _require_local(self, name: str) -> None:
        if isinstance(getattr(self, name), Offloaded):
            raise RuntimeError(f"orchestrator field {name!r} is offloaded: materialize() first")

    # -- offloading -----------------------------------------------------------------------------
    def offload(self, threshold: int) -> None:
        """Move payload fields above `threshold` pickled bytes to the object store.

        A field whose bytes equal those it was materialized from travels on as the same reference.
        """
        if threshold <= 0:
            return
        import ray

        cached: dict[str, Offloaded] = self.__dict__.get("_refs", {})
        for name in PAYLOAD_FIELDS:
            value = getattr(self, name)
            if isinstance(value, Offloaded):
                continue
            data = pickle.dumps(value, protocol=5)
            if len(data) <= threshold:
                continue
            digest = hashlib.blake2b(data, digest_size=16).digest()
            previous = cached.get(name)
            if previous is not None and previous.digest == digest:
                setattr(self, name, previous)
            else:
                setattr(self, name, Offloaded(ray.put(data), len(data), digest))

    async def materialize(self) -> None:
        """Fetch offloaded fields, remembering their references for an unchanged re-offload."""
        refs = self.__dict__.setdefault("_refs", {})
        for name in PAYLOAD_FIELDS:
            value = getattr(self, name)
            if isinstance(value, Offloaded):
                setattr(self, name, pickle.loads(await value.ref))
                refs[name] = value

    def offloaded_ref(self, name: str) -> Offloaded | None:
        """The stored copy `name` was materialized from, if any."""
        return self.__dict__.get("_refs", {}).get(name)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_refs", None)
        return state

    def wire_bytes(self) -> int:
        """Pickled size of the message as it travels between agents."""
        return len(pickle.dumps(self, protocol=5))
