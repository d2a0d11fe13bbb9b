"""Shard ownership (advisory lock) and the cursor compare-and-set fence, step by step."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgflow.log.cursors import (
    BatchOutcome,
    CursorKey,
    advance_cursor,
    consume_once,
    ensure_cursor,
    load_cursor,
    try_lock_shard,
)
from pgflow.log.events import Event, NewEvent, Position, append
from pgflow.log.snapshots import CONSUMED
from pgflow.log.streamer import Filter, read_batch
from tests._util import events_settled, wait_until

Conn = AsyncConnection[Any]
Pool = AsyncConnectionPool[Conn]


async def _seed(pool: Pool, n: int, stream: str = "s", settle: bool = True) -> list[int]:
    async with pool.connection() as conn:
        ids = await append(conn, [NewEvent(stream, "t", f"f{i}") for i in range(n)])
    if settle:
        await events_settled(pool)
    return ids


async def test_second_consumer_of_a_shard_gets_locked(pool: Pool) -> None:
    await _seed(pool, 3)
    key, flt = CursorKey("c"), Filter("s")
    async with pool.connection() as conn:
        await ensure_cursor(conn, key, flt)
    inside, release = asyncio.Event(), asyncio.Event()

    async def slow(events: list[Event], conn: Conn) -> None:
        inside.set()
        await release.wait()

    first = asyncio.create_task(consume_once(pool, key, flt, slow))
    await asyncio.wait_for(inside.wait(), 10)
    second = await consume_once(pool, key, flt, slow)
    assert second.outcome is BatchOutcome.LOCKED
    # Another shard of the same consumer is independent.
    other = await consume_once(pool, CursorKey("c", 1, 2), Filter("s", None, 1, 2), _noop)
    assert other.outcome is not BatchOutcome.LOCKED
    release.set()
    result = await first
    assert result.outcome is BatchOutcome.APPLIED and result.events == 3
    async with pool.connection() as conn:
        assert (await load_cursor(conn, key)) == result.position
    # The lock died with the transaction: the next batch runs (and finds nothing).
    assert (await consume_once(pool, key, flt, slow)).outcome is BatchOutcome.EMPTY


async def test_cas_fences_a_stale_consumer_and_rolls_back_its_effects(
    pgflow_dsn: str, pool: Pool
) -> None:
    ids = await _seed(pool, 4)
    key, flt = CursorKey("c"), Filter("s")
    async with pool.connection() as conn:
        await ensure_cursor(conn, key, flt)
        # Checked at commit, so the two overlapping transactions below can both apply
        # their effects first; the cursor CAS, not the constraint, decides who wins.
        await conn.execute(
            "CREATE TABLE effects (event_id bigint NOT NULL,"
            " UNIQUE (event_id) DEFERRABLE INITIALLY DEFERRED)"
        )

    one = await AsyncConnection.connect(pgflow_dsn)
    two = await AsyncConnection.connect(pgflow_dsn)
    try:
        # Both load the same cursor and read the same batch (no advisory lock: the
        # fence must hold even when ownership checks are bypassed or raced).
        old1, old2 = await load_cursor(one, key), await load_cursor(two, key)
        assert old1 == old2 == Position.start()
        batch1 = await read_batch(one, flt, old1)
        batch2 = await read_batch(two, flt, old2)
        assert [e.id for e in batch1.events] == [e.id for e in batch2.events] == ids
        for conn, batch in ((one, batch1), (two, batch2)):
            async with conn.cursor() as cur:
                rows = [(e.id,) for e in batch.events]
                await cur.executemany("INSERT INTO effects VALUES (%s)", rows)

        assert await advance_cursor(one, key, old1, batch1.positions[-1])
        await one.commit()
        assert not await advance_cursor(two, key, old2, batch2.positions[-1])
        await two.rollback()  # what consume_once does on a lost CAS

        async with pool.connection() as conn:
            cur = await conn.execute("SELECT event_id FROM effects ORDER BY event_id")
            assert [r[0] for r in await cur.fetchall()] == ids  # once each
            assert await load_cursor(conn, key) == batch1.positions[-1]
    finally:
        await one.close()
        await two.close()


async def test_cas_waits_for_the_concurrent_owner_then_fails(pgflow_dsn: str, pool: Pool) -> None:
    """The second CAS blocks on the first one's row lock and fails once it commits."""
    await _seed(pool, 2)
    key, flt = CursorKey("c"), Filter("s")
    async with pool.connection() as conn:
        await ensure_cursor(conn, key, flt)
    one = await AsyncConnection.connect(pgflow_dsn)
    two = await AsyncConnection.connect(pgflow_dsn)
    try:
        batch = await read_batch(one, flt, Position.start())
        new = batch.positions[-1]
        assert await advance_cursor(one, key, Position.start(), new)
        pid_two = two.info.backend_pid
        racing = asyncio.create_task(advance_cursor(two, key, Position.start(), new))

        async def blocked() -> bool:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                    (pid_two,),
                )
                row = await cur.fetchone()
                return bool(row and row[0])

        await wait_until(blocked, timeout=10, message="second CAS waiting on the row lock")
        await one.commit()
        assert await racing is False
        await two.rollback()
    finally:
        await one.close()
        await two.close()


async def test_cursor_never_moves_backwards(pool: Pool) -> None:
    await _seed(pool, 3)
    key, flt = CursorKey("c"), Filter("s")
    async with pool.connection() as conn:
        await ensure_cursor(conn, key, flt)
        batch = await read_batch(conn, flt, Position.start())
        assert await advance_cursor(conn, key, Position.start(), batch.positions[1])
        with pytest.raises(ValueError, match="forwards"):
            await advance_cursor(conn, key, batch.positions[1], batch.positions[0])
        with pytest.raises(ValueError, match="forwards"):
            await advance_cursor(conn, key, batch.positions[1], batch.positions[1])
        # A stale "old" cannot drag it back either: the CAS does not match.
        assert not await advance_cursor(conn, key, Position.start(), batch.positions[0])
        assert await load_cursor(conn, key) == batch.positions[1]


async def test_consume_once_creates_a_missing_cursor(pool: Pool) -> None:
    """Without ensure_cursor the CAS had no row to update: every batch was LOST."""
    ids = await _seed(pool, 2)
    seen: list[int] = []

    async def handler(events: list[Event], conn: Conn) -> None:
        seen.extend(e.id for e in events)

    r = await consume_once(pool, CursorKey("fresh"), Filter("s"), handler)
    assert r.outcome is BatchOutcome.APPLIED and seen == ids
    r = await consume_once(pool, CursorKey("fresh"), Filter("s"), handler)
    assert r.outcome is BatchOutcome.EMPTY and seen == ids
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT stream FROM pgflow.cursors WHERE consumer = 'fresh'")
        assert (await cur.fetchone() or [None])[0] == "s"


async def test_try_lock_shard_takes_no_xid(pool: Pool) -> None:
    """Waiting consumers must not hold the xid horizon back for everyone else."""
    async with pool.connection() as conn, conn.transaction():
        assert await try_lock_shard(conn, CursorKey("c"))
        cur = await conn.execute("SELECT pg_current_xact_id_if_assigned() IS NULL")
        assert (await cur.fetchone() or [False])[0]


async def test_handler_error_rolls_back_effects_and_cursor(pool: Pool) -> None:
    ids = await _seed(pool, 2)
    key, flt = CursorKey("c"), Filter("s")
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE effects (event_id bigint PRIMARY KEY)")

    async def failing(events: list[Event], conn: Conn) -> None:
        await conn.execute("INSERT INTO effects VALUES (%s)", (events[0].id,))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await consume_once(pool, key, flt, failing)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM effects")
        assert (await cur.fetchone() or [1])[0] == 0
        assert await load_cursor(conn, key) == Position.start()

    async def ok(events: list[Event], conn: Conn) -> None:
        for e in events:
            await conn.execute("INSERT INTO effects VALUES (%s)", (e.id,))

    assert (await consume_once(pool, key, flt, ok)).events == 2
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT event_id FROM effects ORDER BY 1")
        assert [r[0] for r in await cur.fetchall()] == ids


async def _noop(events: list[Event], conn: Conn) -> None:
    return None


async def test_consume_once_filter_shapes(pool: Pool) -> None:
    """The consumer's single-statement read (cursor + batch + held-back flag) agrees
    with read_batch for every filter shape, across batch boundaries."""
    kinds = ["a", "b", "c", "a", "b", "a", "c", "b", "a", "a"]
    async with pool.connection() as conn:
        for i, kind in enumerate(kinds):
            await append(conn, [NewEvent("s", kind, f"f{i % 5}")])
            await conn.commit()
        await append(conn, [NewEvent("other", "a", "x")])
    await events_settled(pool)
    async with pool.connection() as conn:
        everything = await read_batch(conn, Filter("s"), Position.start())
    for types in (None, ("a",), ("a", "c")):
        for shard_count in (1, 3):
            for shard in range(shard_count):
                flt = Filter("s", types, shard, shard_count)
                # one consumer name per layout: a new layout of a name would start
                # where the old one had read (ensure_cursor), not at the start
                key = CursorKey(f"c-{types}-{shard_count}", shard, shard_count)
                expected = [
                    e.id
                    for e in everything.events
                    if (types is None or e.type in types) and e.shard_hash % shard_count == shard
                ]
                got: list[int] = []

                async def handler(events: list[Event], conn: Conn, got: list[int] = got) -> None:
                    got.extend(e.id for e in events)

                while True:
                    r = await consume_once(pool, key, flt, handler, batch_size=2)
                    if r.outcome is BatchOutcome.EMPTY:
                        break
                    assert r.outcome is BatchOutcome.APPLIED
                assert got == expected, (types, shard, shard_count)


async def test_consume_once_with_lag(pool: Pool) -> None:
    from datetime import timedelta

    ids = await _seed(pool, 3)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE pgflow.events SET created_at = now() - interval '1 hour' WHERE id <= %s",
            (ids[1],),
        )
    seen: list[int] = []

    async def handler(events: list[Event], conn: Conn) -> None:
        seen.extend(e.id for e in events)

    lag = timedelta(minutes=5)
    r = await consume_once(pool, CursorKey("l"), Filter("s"), handler, lag=lag)
    assert r.events == 2 and seen == ids[:2]
    assert (await consume_once(pool, CursorKey("l"), Filter("s"), handler, lag=lag)).outcome is (
        BatchOutcome.EMPTY
    )
    assert (await consume_once(pool, CursorKey("l"), Filter("s"), handler)).events == 1
    assert seen == ids


async def test_an_older_open_transaction_does_not_hold_a_consumer_back(
    pgflow_dsn: str, pool: Pool
) -> None:
    """0.1 reported such events as held back and delivered them only after the holder
    ended; now they are delivered at once."""
    holder = await AsyncConnection.connect(pgflow_dsn)
    try:
        await holder.execute("SELECT pg_current_xact_id()")
        await _seed(pool, 1, settle=False)
        r = await consume_once(pool, CursorKey("h"), Filter("s"), _noop)
        assert r.outcome is BatchOutcome.APPLIED and r.events == 1
    finally:
        await holder.close()


def test_only_cursor_rows_writes_the_cursor_table() -> None:
    """One owner for cursor writes: the compare-and-set that makes a batch apply once
    is written in pgflow/log/cursor_rows.py only (the table connector's store calls
    it). The xid-reset repair of ``pgflow migrate`` rewrites every row under a table
    lock, which is a schema repair, not a reader's move."""
    root = Path(__file__).resolve().parent.parent / "pgflow"
    writes = re.compile(r"(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+pgflow\.cursors\b", re.I)
    found = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if writes.search(path.read_text())
    }
    assert found == {"log/cursor_rows.py", "ops/migrations.py"}


async def test_consumed_predicate_is_inlined(pool: Pool) -> None:
    """``pgflow.consumed`` (the one definition of "has this cursor read this row") must
    plan as the expression written in place: no function call per row, and index
    bounds beside it still usable. Declared STRICT or VOLATILE it would not inline."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "EXPLAIN (VERBOSE, COSTS OFF) SELECT count(*) FROM pgflow.events e"
            f" JOIN pgflow.cursors c ON c.stream = e.stream AND NOT {CONSUMED}"
        )
        plan = "\n".join(str(r[0]) for r in await cur.fetchall())
    assert "pgflow.consumed" in CONSUMED
    assert "consumed(" not in plan and "pg_visible_in_snapshot" in plan, plan
