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
    """Wait until every committed event is below the xid horizon (deliverable).

    The horizon is cluster-wide: on a shared server other clients' transactions hold
    it back for a moment, and a single-shot read right after a commit may see nothing.
    """

    async def check() -> bool:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT NOT EXISTS (SELECT FROM pgflow.events"
                " WHERE tx >= pg_snapshot_xmin(pg_current_snapshot()))"
            )
            return bool((await cur.fetchone() or [False])[0])

    await wait_until(check, timeout=30, message="events below the xid horizon")


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
