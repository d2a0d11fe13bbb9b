"""What only the memory connector does: its ``position()``, acks out of order, close
waking a waiting recv, and transactional batches. The connector contract it shares
with the brokers is checked by tests/test_connector_conformance.py."""

from __future__ import annotations

import asyncio
from typing import Any

from pgflow.connectors import TransactionalConsumer
from pgflow.connectors.memory import Connector as MemoryConnector
from pgflow.connectors.memory import event


def _events(n: int, start: int = 0) -> list:
    return [
        event(f"e{i}", f"order-{i % 3}", "payment.completed", amount=str(i))
        for i in range(start, start + n)
    ]


async def test_out_of_order_acks_only_advance_a_contiguous_prefix() -> None:
    conn = MemoryConnector(_events(3))
    c = await conn.make("x")
    (_, ack0), (_, ack1), (_, ack2) = [await c.recv() for _ in range(3)]
    await ack2()
    await ack1()
    assert conn.position("x") == 0 and conn.position("other") == 0
    await ack0()
    assert conn.position("x") == 3


async def test_close_wakes_a_waiting_recv() -> None:
    conn = MemoryConnector()
    c = await conn.make("z")
    task = asyncio.create_task(c.recv())
    await asyncio.sleep(0)
    await c.close()
    try:
        await asyncio.wait_for(task, 5)
    except RuntimeError as exc:
        assert "closed" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("recv on a closed consumer must fail")


async def test_transactional_batches_count_only_committed_acks(pool: Any) -> None:
    """Under a workflow runner: acks take effect only if their transaction committed."""
    conn_ = MemoryConnector(_events(5))
    c = await conn_.make("tx")
    assert isinstance(c, TransactionalConsumer)
    async with pool.connection() as conn, conn.transaction(force_rollback=True):
        batch = await c.recv_batch_in(conn, 3)
        assert [e.id for e, _ in batch] == ["e0", "e1", "e2"]
        for _, ack in batch:
            await ack()
    async with pool.connection() as conn, conn.transaction():
        batch = await c.recv_batch_in(conn, 3)  # rolled back: the same events again
        assert [e.id for e, _ in batch] == ["e0", "e1", "e2"]
        await batch[0][1]()
        await batch[1][1]()  # e2's function "failed": not acked
    assert conn_.position("tx") == 0  # not settled until the next batch looks
    async with pool.connection() as conn, conn.transaction():
        batch = await c.recv_batch_in(conn, 10)
        assert [e.id for e, _ in batch] == ["e2", "e3", "e4"]
    assert conn_.position("tx") == 2
