"""The gap-free read, driven step by step with real concurrent transactions.

Each test opens its own connections and interleaves their statements explicitly, so
the interesting orderings (late commits, rollbacks, savepoints, long transactions)
happen every run, not by chance. With snapshot batches nothing else on the server can
hold delivery back, so "delivered" is asserted right after the commit.
"""

from __future__ import annotations

from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgflow.log.cursors import BatchOutcome, CursorKey, consume_once, ensure_cursor
from pgflow.log.events import Event, NewEvent, Position, append
from pgflow.log.streamer import Filter, horizon_age, read_batch
from tests._util import wait_until

Conn = AsyncConnection[Any]
Pool = AsyncConnectionPool[Conn]


async def _open(dsn: str, autocommit: bool = False) -> Conn:
    return await AsyncConnection.connect(dsn, autocommit=autocommit)


async def _read_all(conn: Conn, flt: Filter, after: Position, limit: int = 500) -> list[Event]:
    """Everything currently deliverable after ``after``, following the cursor."""
    return (await _read_to_end(conn, flt, after, limit))[0]


async def _read_to_end(
    conn: Conn, flt: Filter, after: Position, limit: int = 500
) -> tuple[list[Event], Position]:
    """Everything deliverable now after ``after``, and the position after it."""
    out: list[Event] = []
    while True:
        batch = await read_batch(conn, flt, after, limit)
        if batch.position is None:
            return out, after
        out.extend(batch.events)
        after = batch.position


async def _drain_until(
    conn: Conn, flt: Filter, after: Position, ids: set[int], got: list[Event]
) -> Position:
    """Read (appending to ``got``) everything deliverable now; all of ``ids`` must be."""
    events, after = await _read_to_end(conn, flt, after)
    got.extend(events)
    assert ids <= {e.id for e in got}, f"events {sorted(ids - {e.id for e in got})} missing"
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

        # B is delivered at once, although A (lower id, older xid) is still open...
        got: list[Event] = []
        pos = await _drain_until(reader, flt, Position.start(), {b_id}, got)
        assert [e.id for e in got] == [b_id]
        # ...and so would an id-only cursor, which then moves past A's id.
        cur = await reader.execute("SELECT max(id) FROM pgflow.events WHERE id > 0")
        id_cursor = (await cur.fetchone() or [0])[0]
        assert id_cursor == b_id

        await a.commit()
        pos = await _drain_until(reader, flt, pos, {a_id, b_id}, got)
        assert [e.id for e in got] == [b_id, a_id]  # commit order
        assert await _read_all(reader, flt, pos) == []  # exactly once

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
        got: list[Event] = []
        pos = await _drain_until(reader, flt, Position.start(), {b_id}, got)
        await a.commit()
        await _drain_until(reader, flt, pos, {a_id, b_id}, got)
        assert [e.id for e in got] == [b_id, a_id]
        # Read together (one diff), the two come out in id order.
        assert [e.id for e in await _read_all(reader, flt, Position.start())] == [b_id, a_id]
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
    assert results[0].position is not None and results[0].position.after_id == ids[2]
    assert results[1].position is not None and results[1].position.after_id == ids[5]
    assert sum(r.events for r in results) == 8


async def test_long_running_writer_holds_back_only_itself(pgflow_dsn: str) -> None:
    """0.1 stalled every reader behind an open xid; now only the open transaction's own
    events wait, and the oldest-transaction age is still reported."""
    flt = Filter("s")
    long, w, reader = (
        await _open(pgflow_dsn),
        await _open(pgflow_dsn),
        await _open(pgflow_dsn, autocommit=True),
    )
    try:
        async with await AsyncConnection.connect(pgflow_dsn) as c:
            await ensure_cursor(c, CursorKey("lagging"), flt)
        [held] = await append(long, [NewEvent("s", "t", "held")])  # open, with an event
        [e_id] = await append(w, [NewEvent("s", "t", "f")])
        await w.commit()

        got: list[Event] = []
        pos = await _drain_until(reader, flt, Position.start(), {e_id}, got)
        assert [e.id for e in got] == [e_id]
        age = await wait_until(
            lambda: _positive(horizon_age(reader), 0.1), timeout=10, message="horizon age"
        )
        assert age >= 0.1
        cur = await reader.execute(
            "SELECT lag_events, lag_seconds FROM pgflow.consumer_lag WHERE consumer = 'lagging'"
        )
        lag_events, lag_seconds = await cur.fetchone() or (0, 0.0)
        assert lag_events == 1 and lag_seconds > 0  # the committed one; held is invisible

        await long.commit()
        await _drain_until(reader, flt, pos, {held}, got)
        assert [e.id for e in got] == [e_id, held]  # delivered once, not lost
    finally:
        for c in (long, w, reader):
            await c.close()


async def _positive(value: Any, at_least: float) -> float:
    v = float(await value)
    return v if v >= at_least else 0.0


class _Rollback(Exception):
    pass
