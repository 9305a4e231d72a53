"""Offloading: a 20-turn history travels as an object-store reference, and comes back intact."""

from __future__ import annotations

import asyncio

from matrix_provider.runtime.orchestrator import Offloaded, Orchestrator


class _Msg(Orchestrator):
    def route(self, done: str | None) -> str | None:
        return None


def _conversation() -> _Msg:
    msg = _Msg(id="row-1", partition=0, delivery=1, deadline=0.0, row={"text": "x" * 2000})
    for turn in range(20):
        msg.add_turn("user" if turn % 2 else "assistant", f"turn {turn}: " + "reasoning step " * 120)
    return msg


def test_twenty_turn_history_is_offloaded(ray_client, capsys) -> None:
    msg = _conversation()
    inline = msg.wire_bytes()
    msg.offload(16384)
    offloaded = msg.wire_bytes()
    assert isinstance(msg.history, Offloaded)
    assert not isinstance(msg.row, Offloaded)  # 2 KB row stays inline
    with capsys.disabled():
        print(
            f"\n[offload] 20-turn history: {inline:,} bytes per message inline, {offloaded:,} offloaded "
            f"({inline / offloaded:.0f}x smaller)"
        )
    assert offloaded * 10 < inline
    asyncio.run(msg.materialize())
    assert msg.history == _conversation().history
    # Unchanged history is not put again: the same reference travels on.
    ref = msg.offloaded_ref("history")
    msg.offload(16384)
    assert msg.history is ref
    # A new turn changes its bytes: it is put afresh.
    asyncio.run(msg.materialize())
    msg.add_turn("user", "one more")
    msg.offload(16384)
    assert msg.history is not ref and isinstance(msg.history, Offloaded)


def test_offloading_off_keeps_everything_inline() -> None:
    msg = _conversation()
    size = msg.wire_bytes()
    msg.offload(0)
    assert msg.wire_bytes() == size


def test_in_place_edits_of_offloaded_fields_survive_the_next_hop(ray_client) -> None:
    """Roles may edit fields in place (`msg.row[k] = v`, `msg.history.append`): no edit is lost."""
    msg = _conversation()
    msg.offload(16384)
    asyncio.run(msg.materialize())
    msg.history.append({"role": "user", "content": "appended in place"})
    msg.row["text"] = "y" * 30000  # the row is now large too
    msg.row["note"] = "edited in place"
    msg.offload(16384)
    assert isinstance(msg.history, Offloaded) and isinstance(msg.row, Offloaded)
    asyncio.run(msg.materialize())
    assert msg.history[-1]["content"] == "appended in place"
    assert msg.row["note"] == "edited in place"


def test_a_small_message_travels_as_its_one_pickle() -> None:
    """`offload` pickles the message once and a hop sends those bytes: nothing is pickled twice."""
    msg = _Msg(id="row-2", partition=0, delivery=1, deadline=0.0, row={"text": "short"}, key="u/2")
    msg.add_turn("user", "hello")
    msg.offload(16384)
    wire = msg.wire()
    assert isinstance(wire, bytes) and len(wire) == msg.wire_bytes()
    back = Orchestrator.unwire(wire)
    assert (back.id, back.key, back.row, back.history) == (msg.id, msg.key, msg.row, msg.history)
    assert msg.wire() is msg  # the bytes went with the first send: a retry sends the message itself
