"""Coalesced actor calls: one call per batch, every sender told of its own batch's fate."""

from __future__ import annotations

import asyncio

import pytest

from matrix_provider.runtime.outbox import Outbox


def test_messages_sent_together_share_calls_and_all_are_delivered() -> None:
    calls: list[list[int]] = []

    async def send(items: list[int]) -> None:
        calls.append(items)

    async def main() -> None:
        box = Outbox(send, max_batch=64, linger_s=0.01)
        await asyncio.gather(*(box.put(i) for i in range(150)))

    asyncio.run(main())
    assert sorted(i for call in calls for i in call) == list(range(150))
    # 64 at a time, the last 22 after the linger: even the first waits for company
    assert [len(c) for c in calls] == [64, 64, 22]


def test_a_failed_call_raises_in_every_sender_of_that_batch_only() -> None:
    async def send(items: list[int]) -> None:
        if 1 in items:
            raise ConnectionError("actor died")

    async def main() -> list[object]:
        box = Outbox(send, max_batch=2, linger_s=0.01)
        return await asyncio.gather(*(box.put(i) for i in range(5)), return_exceptions=True)

    outcomes = asyncio.run(main())  # batches [0, 1], [2, 3], [4]: both senders of [0, 1] hear of it
    assert [type(o).__name__ for o in outcomes] == [
        "ConnectionError",
        "ConnectionError",
        "NoneType",
        "NoneType",
        "NoneType",
    ]


def test_a_sender_waits_until_its_batch_is_accepted() -> None:
    gate = asyncio.Event()

    async def send(items: list[int]) -> None:
        await gate.wait()  # the receiver's queue is full: backpressure

    async def main() -> None:
        box = Outbox(send, max_batch=8, linger_s=0.001)
        put = asyncio.ensure_future(box.put(1))
        await asyncio.sleep(0.05)
        assert not put.done()
        gate.set()
        await asyncio.wait_for(put, 1)

    asyncio.run(main())


@pytest.mark.parametrize("linger_s", [0.0, 0.002])
def test_a_lone_message_goes_out_after_the_linger(linger_s: float) -> None:
    sent: list[list[str]] = []

    async def send(items: list[str]) -> None:
        sent.append(items)

    async def main() -> None:
        await asyncio.wait_for(Outbox(send, linger_s=linger_s).put("x"), 1)

    asyncio.run(main())
    assert sent == [["x"]]
