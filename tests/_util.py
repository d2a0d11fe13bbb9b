"""Test utilities: waiting on conditions with a deadline (never sleep-and-hope)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


async def events_settled(pool: Any) -> None:
    """Kept for the tests that used to wait for the xid horizon: with snapshot batches
    every committed event is deliverable at once, so there is nothing to wait for."""
    del pool


async def take_batch(
    consumer: Any, pool: Any, expect: int = 0, *, limit: int = 100, commit: bool = True
) -> list[Any]:
    """Ack and commit (or, with ``commit=False``, roll back) the next ``recv_batch_in``
    batch of a transactional consumer; poll until it has ``expect`` events (concurrent
    sessions in the cluster may hold the xid horizon back for a moment). Returns the
    events."""
    deadline = time.monotonic() + 30
    while True:
        async with pool.connection() as conn, conn.transaction(force_rollback=not commit):
            batch = await consumer.recv_batch_in(conn, limit)
            if len(batch) >= expect:
                for _, ack in batch:
                    await ack()
                return [e for e, _ in batch]
        assert time.monotonic() < deadline, f"no batch of {expect}"
        await asyncio.sleep(0.02)
