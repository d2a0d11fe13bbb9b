"""The gap-free read, driven step by step with real concurrent transactions.

Each test opens its own connections and interleaves their statements explicitly, so
the interesting orderings (late commits, rollbacks, savepoints, long transactions)
happen every run, not by chance. The xid horizon is cluster-wide: other tests running
on the same server can hold it back for a moment, so "eventually delivered" is always
awaited with a deadline, while "not delivered yet" is asserted at once (another
transaction can only make the horizon lower).
"""

from __future__ import annotations

from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgflow.cursors import BatchOutcome, CursorKey, consume_once, ensure_cursor
from pgflow.events import Event, NewEvent, Position, append
from pgflow.streamer import Filter, horizon_age, read_batch
from tests._util import wait_until

Conn = AsyncConnection[Any]
Pool = AsyncConnectionPool[Conn]


async def _open(dsn: str, autocommit: bool = False) -> Conn:
    return await AsyncConnection.connect(dsn, autocommit=autocommit)


async def _read_all(conn: Conn, flt: Filter, after: Position, limit: int = 500) -> list[Event]:
    """Everything currently deliverable after ``after``, following the cursor."""
    out: list[Event] = []
    while True:
        batch = await read_batch(conn, flt, after, limit)
        out.extend(batch)
        if len(batch) < limit:
            return out
        after = batch[-1].position


async def _drain_until(
    conn: Conn, flt: Filter, after: Position, ids: set[int], got: list[Event]
) -> Position:
    """Read (appending to ``got``) until every id in ``ids`` was delivered."""

    async def done() -> bool:
        nonlocal after
        batch = await _read_all(conn, flt, after)
        if batch:
            got.extend(batch)
            after = batch[-1].position
        return ids <= {e.id for e in got}

    await wait_until(done, timeout=10, message=f"events {sorted(ids)} delivered")
    return after


async def test_late_commit_of_lower_id_is_not_skipped(pgflow_dsn: str) -> None:
    flt = Filter("s")
    a, b, reader = (
        await _open(pgflow_dsn),
        await _open(pgflow_dsn),
        await _open(pgflow_dsn, autocommit=True),
    )
    try:
        [a_id] = await append(a, [NewEvent("s", "t", "fa")])  # tx A: lower id, open
        [b_id] = await append(b, [NewEvent("s", "t", "fb")])  # tx B: higher id
        await b.commit()
        assert b_id > a_id

        # The horizon hides B while A (older xid) is running...
        assert await read_batch(reader, flt, Position.start()) == []
        # ...whereas an id-only cursor would deliver B now and move past A's id.
        cur = await reader.execute("SELECT max(id) FROM pgflow.events WHERE id > 0")
        id_cursor = (await cur.fetchone() or [0])[0]
        assert id_cursor == b_id

        await a.commit()
        got: list[Event] = []
        pos = await _drain_until(reader, flt, Position.start(), {a_id, b_id}, got)
        assert [e.id for e in got] == [a_id, b_id]  # (tx, id) order: A's tx is older
        assert got[0].tx < got[1].tx
        assert await read_batch(reader, flt, pos) == []  # exactly once

        # The contrast: the id-only cursor never sees A.
        cur = await reader.execute("SELECT id FROM pgflow.events WHERE id > %s", (id_cursor,))
        assert await cur.fetchall() == []
    finally:
        for c in (a, b, reader):
            await c.close()


async def test_early_xid_with_later_id_sorts_first(pgflow_dsn: str) -> None:
    """An xid taken before another transaction's insert gets a LATER id: (tx, id) order
    still delivers it, and a single high-water mark on id would have skipped it."""
    flt = Filter("s")
    a, b, reader = (
        await _open(pgflow_dsn),
        await _open(pgflow_dsn),
        await _open(pgflow_dsn, autocommit=True),
    )
    try:
        await a.execute("SELECT pg_current_xact_id()")  # A holds an xid, no row yet
        [b_id] = await append(b, [NewEvent("s", "t", "fb")])
        await b.commit()
        [a_id] = await append(a, [NewEvent("s", "t", "fa")])
        assert a_id > b_id
        assert await read_batch(reader, flt, Position.start()) == []
        await a.commit()
        got: list[Event] = []
        await _drain_until(reader, flt, Position.start(), {a_id, b_id}, got)
        assert [e.id for e in got] == [a_id, b_id]
    finally:
        for c in (a, b, reader):
            await c.close()


async def test_rollback_gaps_never_stall_the_reader(pgflow_dsn: str, pool: Pool) -> None:
    flt = Filter("s")
    w, reader = await _open(pgflow_dsn), await _open(pgflow_dsn, autocommit=True)
    try:
        first = await append(w, [NewEvent("s", "t", "f1")])
        await w.commit()
        lost = await append(w, [NewEvent("s", "t", f"x{i}") for i in range(3)])
        await w.rollback()
        later = await append(w, [NewEvent("s", "t", "f2"), NewEvent("s", "t", "f3")])
        await w.commit()
        assert min(later) > max(lost) > max(first)  # the rolled-back ids are holes

        got: list[Event] = []
        await _drain_until(reader, flt, Position.start(), set(first + later), got)
        assert [e.id for e in got] == first + later

        # A consumer crosses the hole in one batch and stops exactly at the end.
        seen: list[int] = []

        async def handler(events: list[Event], conn: Conn) -> None:
            seen.extend(e.id for e in events)

        async with await AsyncConnection.connect(pgflow_dsn) as c:
            await ensure_cursor(c, CursorKey("c"), flt)
        assert (await consume_once(pool, CursorKey("c"), flt, handler)).events == 3
        assert (await consume_once(pool, CursorKey("c"), flt, handler)).outcome is (
            BatchOutcome.EMPTY
        )
        assert seen == first + later
    finally:
        await w.close()
        await reader.close()


async def test_savepoints(pgflow_dsn: str) -> None:
    flt = Filter("s")
    w, reader = await _open(pgflow_dsn), await _open(pgflow_dsn, autocommit=True)
    try:
        # The very first write happens inside a savepoint: the event must still carry
        # the TOP-level xid (a subtransaction xid would break the horizon comparison).
        async with w.transaction():
            async with w.transaction():
                [kept1] = await append(w, [NewEvent("s", "t", "kept1")])
            with pytest.raises(_Rollback):
                async with w.transaction():
                    await append(w, [NewEvent("s", "t", "gone1"), NewEvent("s", "t", "gone2")])
                    raise _Rollback
            async with w.transaction():
                [kept2] = await append(w, [NewEvent("s", "t", "kept2")])
            cur = await w.execute("SELECT pg_current_xact_id()")
            top = int((await cur.fetchone() or [0])[0])

        got: list[Event] = []
        await _drain_until(reader, flt, Position.start(), {kept1, kept2}, got)
        assert [e.foreign_id for e in got] == ["kept1", "kept2"]
        assert {e.tx for e in got} == {top}
        cur = await reader.execute("SELECT count(*) FROM pgflow.events")
        assert (await cur.fetchone() or [0])[0] == 2
    finally:
        await w.close()
        await reader.close()


async def test_batch_boundary_inside_one_transaction(pgflow_dsn: str, pool: Pool) -> None:
    flt = Filter("s")
    w = await _open(pgflow_dsn)
    try:
        ids = await append(w, [NewEvent("s", "t", f"f{i}") for i in range(7)])
        await w.commit()
        other = await append(w, [NewEvent("s", "t", "next")])
        await w.commit()
    finally:
        await w.close()
    key = CursorKey("c")
    async with await AsyncConnection.connect(pgflow_dsn) as c:
        await ensure_cursor(c, key, flt)
    seen: list[Event] = []

    async def handler(events: list[Event], conn: Conn) -> None:
        seen.extend(events)

    results = []

    async def step() -> bool:
        r = await consume_once(pool, key, flt, handler, batch_size=3)
        if r.outcome is BatchOutcome.APPLIED:
            results.append(r)
        return {e.id for e in seen} >= set(ids + other)

    await wait_until(step, timeout=10, message="all events consumed")
    assert [e.id for e in seen] == ids + other  # no loss, no duplicate
    assert len({e.tx for e in seen[:7]}) == 1
    # The cursor stopped twice inside the 7-event transaction and resumed correctly.
    assert [r.events for r in results[:2]] == [3, 3]
    assert results[0].position == seen[2].position
    assert results[1].position == seen[5].position
    assert sum(r.events for r in results) == 8


async def test_long_running_writer_holds_delivery_back(pgflow_dsn: str) -> None:
    flt = Filter("s")
    long, w, reader = (
        await _open(pgflow_dsn),
        await _open(pgflow_dsn),
        await _open(pgflow_dsn, autocommit=True),
    )
    try:
        async with await AsyncConnection.connect(pgflow_dsn) as c:
            await ensure_cursor(c, CursorKey("lagging"), flt)
        await long.execute("SELECT pg_current_xact_id()")  # holds an xid, writes nothing
        [e_id] = await append(w, [NewEvent("s", "t", "f")])
        await w.commit()

        assert await read_batch(reader, flt, Position.start()) == []
        age = await wait_until(
            lambda: _positive(horizon_age(reader), 0.1), timeout=10, message="horizon age"
        )
        assert age >= 0.1
        cur = await reader.execute(
            "SELECT lag_events, lag_seconds FROM pgflow.consumer_lag WHERE consumer = 'lagging'"
        )
        lag_events, lag_seconds = await cur.fetchone() or (0, 0.0)
        assert lag_events == 1 and lag_seconds > 0
        assert await read_batch(reader, flt, Position.start()) == []  # still held back

        await long.commit()
        got: list[Event] = []
        await _drain_until(reader, flt, Position.start(), {e_id}, got)
        assert [e.id for e in got] == [e_id]  # delivered, not lost
    finally:
        for c in (long, w, reader):
            await c.close()


async def _positive(value: Any, at_least: float) -> float:
    v = float(await value)
    return v if v >= at_least else 0.0


class _Rollback(Exception):
    pass
