"""The orchestrator: one message per input row carrying its data flow and its control flow.

Data: the input row, the conversation history, each role's results, token usage.
Control: which role acts next, which delivery this is, the row's deadline.
A pipeline subclasses `Orchestrator` and writes its routing in `route()`; agents call it after
each step and hand the message straight to a replica of the role it names.

A hop between processes pickles the message once: `offload()` pickles it, and a message of at
most `orchestrator.offload_bytes` travels as those bytes (`wire()`), so nothing is pickled twice and
nothing is pickled only to learn its size. Only a larger one is split: any payload field whose
pickle is above the threshold goes to Ray's object store and the message keeps the reference;
`materialize()` brings it back on the next agent and keeps the bytes it came from. Roles may change
fields any way they like (setters or in place: `msg.row[k] = v`, `msg.history.append(...)`):
`offload()` compares the field's new pickle with those bytes (a memcmp, no digest) and reuses the
stored copy only when nothing changed, so no edit is lost. A hop between chained roles of one
process (`runtime/chains.py`) does none of this: the message object itself moves.
"""

from __future__ import annotations

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

    # -- travelling between processes -------------------------------------------------------------
    def offload(self, threshold: int) -> None:
        """Make the message ready for a hop to another process (see the module's docstring).

        With `threshold` 0 (offloading off) the message always travels as its pickle.
        """
        state = self.__dict__
        state.pop("_packed", None)
        if not any(isinstance(getattr(self, name), Offloaded) for name in PAYLOAD_FIELDS):
            packed = pickle.dumps(self, protocol=5)
            if threshold <= 0 or len(packed) <= threshold:
                state["_packed"] = packed
                return
        import ray

        cached: dict[str, tuple[Offloaded, bytes]] = state.get("_refs", {})
        for name in PAYLOAD_FIELDS:
            value = getattr(self, name)
            if isinstance(value, Offloaded):
                continue
            data = pickle.dumps(value, protocol=5)
            if len(data) <= threshold:
                continue
            previous = cached.get(name)
            if previous is not None and previous[1] == data:
                setattr(self, name, previous[0])
            else:
                setattr(self, name, Offloaded(ray.put(data), len(data)))

    def wire(self) -> bytes | Orchestrator:
        """What a hop sends: the pickle `offload()` kept, else the message itself (a message with
        object-store references must be pickled by Ray, which counts the references it carries)."""
        packed: bytes | None = self.__dict__.pop("_packed", None)
        return packed if packed is not None else self

    @staticmethod
    def unwire(item: bytes | Orchestrator) -> Orchestrator:
        """The message a hop carried (`wire()`)."""
        return pickle.loads(item) if isinstance(item, bytes) else item

    async def materialize(self) -> None:
        """Fetch offloaded fields, keeping their references and bytes for an unchanged re-offload."""
        refs = self.__dict__.setdefault("_refs", {})
        for name in PAYLOAD_FIELDS:
            value = getattr(self, name)
            if isinstance(value, Offloaded):
                data = await value.ref
                setattr(self, name, pickle.loads(data))
                refs[name] = (value, data)

    def offloaded_ref(self, name: str) -> Offloaded | None:
        """The stored copy `name` was materialized from, if any."""
        held = self.__dict__.get("_refs", {}).get(name)
        return held[0] if held is not None else None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_refs", None)
        state.pop("_packed", None)
        return state

    def wire_bytes(self) -> int:
        """Pickled size of the message as it travels between agents."""
        return len(pickle.dumps(self, protocol=5))
