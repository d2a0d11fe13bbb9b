"""Snapshot batches: no open transaction anywhere stalls a reader (issue 8).

Each test interleaves real connections deterministically: a transaction is held open
(in another database, idle in transaction, prepared) while other commits flow; those
must be read at once, the held events exactly once after their commit, rolled-back
events never.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from pgflow.log.cursors import BatchOutcome, CursorKey, consume_once, ensure_cursor
from pgflow.log.events import Event, NewEvent, append
from pgflow.log.snapshots import Position
from pgflow.log.streamer import Filter, read_batch
from pgflow.ops.migrations import known_migrations, migrate
from pgflow.postgres import throwaway_cluster

STREAM = "snap"


async def _commit_events(dsn: str, n: int, foreign_id: str = "f") -> list[int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        ids = await append(conn, [NewEvent(STREAM, "t", f"{foreign_id}{i}") for i in range(n)])
        await conn.commit()
    return ids


async def _read_all(dsn: str, after: Position, limit: int = 1000) -> tuple[list[int], Position]:
    """Every event readable now, chunk by chunk; returns ids and the final position."""
    ids: list[int] = []
    position = after
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while True:
            batch = await read_batch(conn, Filter(STREAM), position, limit)
            if batch.position is None:
                return ids, position
            ids += [e.id for e in batch.events]
            position = batch.position


def _other_database(dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = "postgres"
    return make_conninfo("", **params)


@pytest.fixture
async def held_xid_elsewhere(pgflow_dsn: str) -> AsyncIterator[None]:
    """A transaction holding an xid in ANOTHER database, open for the whole test."""
    async with await psycopg.AsyncConnection.connect(_other_database(pgflow_dsn)) as conn:
        await conn.execute("SELECT pg_current_xact_id()")
        yield
        await conn.rollback()


async def test_open_writer_in_another_database_does_not_stall(
    pgflow_dsn: str, held_xid_elsewhere: None
) -> None:
    ids = await _commit_events(pgflow_dsn, 5)
    got, _ = await _read_all(pgflow_dsn, Position.start())
    assert got == ids  # read at once, in one pass: nothing waits for the open writer


async def test_idle_in_transaction_writer_delays_only_its_own_events(pgflow_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as held:
        held_ids = await append(held, [NewEvent(STREAM, "t", "held")])  # idle in tx
        first = await _commit_events(pgflow_dsn, 3, "a")
        got, position = await _read_all(pgflow_dsn, Position.start())
        assert got == first
        second = await _commit_events(pgflow_dsn, 2, "b")
        got, position = await _read_all(pgflow_dsn, position)
        assert got == second
        await held.commit()
    got, position = await _read_all(pgflow_dsn, position)
    assert got == held_ids  # exactly once, after its commit
    got, _ = await _read_all(pgflow_dsn, position)
    assert got == []


async def test_rolled_back_events_are_never_read(pgflow_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as held:
        await append(held, [NewEvent(STREAM, "t", "gone")])
        kept = await _commit_events(pgflow_dsn, 2)
        got, position = await _read_all(pgflow_dsn, Position.start())
        assert got == kept
        await held.rollback()
    later = await _commit_events(pgflow_dsn, 1, "z")
    got, _ = await _read_all(pgflow_dsn, position)
    assert got == later


@pytest.mark.slow  # starts a throwaway cluster
async def test_prepared_transaction_delays_only_its_own_events() -> None:
    with throwaway_cluster() as cluster:
        await migrate(cluster.dsn)
        gid = f"pgflow-test-{uuid.uuid4()}"
        async with await psycopg.AsyncConnection.connect(cluster.dsn, autocommit=True) as conn:
            await conn.execute("BEGIN")
            await append(conn, [NewEvent(STREAM, "t", "prepared")])
            await conn.execute(f"PREPARE TRANSACTION '{gid}'")
        try:
            flowing = await _commit_events(cluster.dsn, 3)
            got, position = await _read_all(cluster.dsn, Position.start())
            assert got == flowing
        finally:
            async with await psycopg.AsyncConnection.connect(cluster.dsn, autocommit=True) as conn:
                await conn.execute(f"COMMIT PREPARED '{gid}'")
        got, _ = await _read_all(cluster.dsn, position)
        assert len(got) == 1


async def test_lock_serialised_writers_come_out_in_commit_order(pgflow_dsn: str) -> None:
    """T2 takes its xid first, then blocks on T1's row lock; T1 commits, then T2. Both
    land in one diff: T1's event must come first ((tx, id) order would invert them)."""
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as setup:
        await setup.execute("CREATE TABLE lockme (k int PRIMARY KEY)")
        await setup.execute("INSERT INTO lockme VALUES (1)")
    t1 = await psycopg.AsyncConnection.connect(pgflow_dsn)
    t2 = await psycopg.AsyncConnection.connect(pgflow_dsn)
    try:
        cur = await t2.execute("SELECT pg_current_xact_id()::text::bigint")
        xid2 = (await cur.fetchone() or [0])[0]
        await t1.execute("SELECT * FROM lockme WHERE k = 1 FOR UPDATE")
        (e1,) = await append(t1, [NewEvent(STREAM, "t", "x")])
        cur = await t1.execute("SELECT pg_current_xact_id()::text::bigint")
        assert (await cur.fetchone() or [0])[0] > xid2

        async def second() -> int:
            await t2.execute("SELECT * FROM lockme WHERE k = 1 FOR UPDATE")  # blocks
            (e2,) = await append(t2, [NewEvent(STREAM, "t", "x")])
            await t2.commit()
            return e2

        task = asyncio.create_task(second())
        await asyncio.sleep(0.2)
        assert not task.done()  # really blocked on T1's lock
        await t1.commit()
        e2 = await asyncio.wait_for(task, 10)
    finally:
        await t1.close()
        await t2.close()
    got, _ = await _read_all(pgflow_dsn, Position.start())
    assert got == [e1, e2]


async def test_a_forged_tx_is_stamped_with_the_writers_own(pgflow_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        _, position = await _read_all(pgflow_dsn, Position.start())
        await _commit_events(pgflow_dsn, 1)
        _, position = await _read_all(pgflow_dsn, position)  # S1 is now past xid 3
        cur = await conn.execute(
            "INSERT INTO pgflow.events (stream, type, foreign_id, tx)"
            " VALUES (%s, 't', 'forged', '3') RETURNING id, tx::text, pg_current_xact_id()::text",
            (STREAM,),
        )
        row = await cur.fetchone()
        assert row is not None and row[1] == row[2]
        cur = await conn.execute(
            "INSERT INTO pgflow.changes (table_name, op, pk, tx) VALUES ('x', 'INSERT', '1', '3')"
            " RETURNING tx::text"
        )
        assert (await cur.fetchone() or [None])[0] == row[2]
        await conn.commit()
    got, _ = await _read_all(pgflow_dsn, position)
    assert got == [row[0]]


async def test_a_backlog_is_read_in_id_order_chunks_around_a_long_transaction(
    pgflow_dsn: str,
) -> None:
    """A diff much larger than a batch, with a transaction that was open at S1 (part A,
    low ids) interleaved with later ones (part B): every event once, in id order."""
    _, position = await _read_all(pgflow_dsn, Position.start())
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as long_tx:
        early = await append(long_tx, [NewEvent(STREAM, "t", f"long{i}") for i in range(7)])
        await _commit_events(pgflow_dsn, 1)
        _, position = await _read_all(pgflow_dsn, position)  # S1: long_tx in progress
        later = await _commit_events(pgflow_dsn, 40)
        more = await append(long_tx, [NewEvent(STREAM, "t", "long-late")])
        await long_tx.commit()
    got, position = await _read_all(pgflow_dsn, position, limit=6)
    assert sorted(got) == got
    assert sorted(got) == sorted(early + later + more)
    got, _ = await _read_all(pgflow_dsn, position)
    assert got == []


async def test_consumer_moves_past_a_writer_held_elsewhere(
    pgflow_dsn: str, held_xid_elsewhere: None
) -> None:
    seen: list[int] = []

    async def handler(events: list[Event], conn: Any) -> None:
        seen.extend(e.id for e in events)

    ids = await _commit_events(pgflow_dsn, 3)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(pgflow_dsn, min_size=1, open=False)
    await pool.open(wait=True)
    try:
        key, flt = CursorKey("c"), Filter(STREAM)
        async with pool.connection() as conn:
            await ensure_cursor(conn, key, flt)
        result = await consume_once(pool, key, flt, handler, batch_size=2)
        assert result.outcome is BatchOutcome.APPLIED and result.events == 2
        result = await consume_once(pool, key, flt, handler, batch_size=2)
        assert result.outcome is BatchOutcome.APPLIED and result.events == 1
        result = await consume_once(pool, key, flt, handler, batch_size=2)
        assert result.outcome is BatchOutcome.EMPTY
    finally:
        await pool.close()
    assert seen == ids


async def test_migration_converts_01_cursors_with_nothing_redelivered_or_skipped(
    pgflow_server: Any,
) -> None:
    """Positions written by 0.1 ((tx, id) below the horizon) become snapshot positions:
    the events after each cursor, and only those, are read afterwards."""
    dsn = pgflow_server.dsn_for(f"pgflow_conv_{uuid.uuid4().hex[:8]}")
    name = conninfo_to_dict(dsn)["dbname"]
    async with await psycopg.AsyncConnection.connect(pgflow_server.server, autocommit=True) as a:
        await a.execute(f'CREATE DATABASE "{name}"')
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(
                "CREATE SCHEMA pgflow; CREATE TABLE pgflow.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for m in known_migrations():
                if m.version <= 4:
                    async with conn.transaction():
                        await conn.execute(m.path.read_text())
                        await conn.execute(
                            "INSERT INTO pgflow.schema_migrations (version, name) VALUES (%s, %s)",
                            (m.version, m.name),
                        )
            # three transactions of 3 events each
            for t in range(3):
                async with conn.transaction():
                    for i in range(3):
                        await conn.execute(
                            "INSERT INTO pgflow.events (stream, type, foreign_id)"
                            " VALUES (%s, 't', %s)",
                            (STREAM, f"{t}-{i}"),
                        )
            cur = await conn.execute("SELECT tx::text, id FROM pgflow.events ORDER BY tx, id")
            rows = await cur.fetchall()
            # cursor A in the middle of the second transaction, B at the very end,
            # C at the start
            await conn.execute(
                "INSERT INTO pgflow.cursors (consumer, shard, shard_count, tx, id, stream)"
                " VALUES ('A', 0, 1, %s::xid8, %s, %s), ('B', 0, 1, %s::xid8, %s, %s),"
                " ('C', 0, 1, '0', 0, %s)",
                (rows[4][0], rows[4][1], STREAM, rows[8][0], rows[8][1], STREAM, STREAM),
            )
        await migrate(dsn)
        all_ids = [int(r[1]) for r in rows]
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for consumer, expected in (("A", all_ids[5:]), ("B", []), ("C", all_ids)):
                seen: list[int] = []
                pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, min_size=1, open=False)
                await pool.open(wait=True)

                async def handler(events: list[Event], c: Any, seen: list[int] = seen) -> None:
                    seen.extend(e.id for e in events)

                try:
                    while True:
                        r = await consume_once(
                            pool, CursorKey(consumer), Filter(STREAM), handler, batch_size=2
                        )
                        if r.outcome is not BatchOutcome.APPLIED:
                            break
                finally:
                    await pool.close()
                assert seen == expected, consumer
            del conn
    finally:
        async with await psycopg.AsyncConnection.connect(
            pgflow_server.server, autocommit=True
        ) as a:
            await a.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_a_reader_leaves_an_exhausted_diff_even_with_nothing_new(pgflow_dsn: str) -> None:
    """A position inside a diff whose remaining rows are gone (pruned) moves to the
    diff's end with a batch of no events, instead of re-reading the diff forever."""
    ids = await _commit_events(pgflow_dsn, 3)
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        first = await read_batch(conn, Filter(STREAM), Position.start(), limit=2)
        inside = first.positions[-1]
        assert inside.upto is not None and inside.after_id == ids[1]
        await conn.execute("DELETE FROM pgflow.events WHERE id = %s", (ids[2],))
        moved = await read_batch(conn, Filter(STREAM), inside, limit=2)
        assert moved.events == [] and moved.positions == [Position(inside.upto)]
        assert (await read_batch(conn, Filter(STREAM), moved.positions[0])).position is None


async def test_a_new_shard_layout_starts_where_the_old_one_had_read(pgflow_dsn: str) -> None:
    """parallel_count 1 -> 2: the new layout's shards start where every shard of the
    complete old layout had read, not at the start of the log."""
    seen: dict[str, list[int]] = {"old": [], "new": []}

    def handler(into: str) -> Any:
        async def h(events: list[Event], conn: Any) -> None:
            seen[into].extend(e.id for e in events)

        return h

    old_ids = await _commit_events(pgflow_dsn, 6)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(pgflow_dsn, min_size=1, open=False)
    await pool.open(wait=True)
    try:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as held:
            held_ids = await append(held, [NewEvent(STREAM, "t", "late")])  # open at S1
            r = await consume_once(pool, CursorKey("step"), Filter(STREAM), handler("old"))
            assert r.events == 6 and seen["old"] == old_ids
            await held.commit()
        new_ids = await _commit_events(pgflow_dsn, 4, "n")
        for shard in range(2):
            key, flt = CursorKey("step", shard, 2), Filter(STREAM, None, shard, 2)
            async with pool.connection() as conn:
                await ensure_cursor(conn, key, flt)
            while (await consume_once(pool, key, flt, handler("new"))).events:
                pass
    finally:
        await pool.close()
    # Not the 6 the old layout read; the late commit and the new ones, once each.
    assert sorted(seen["new"]) == sorted(held_ids + new_ids)


def test_inherited_snapshot_is_the_intersection_of_complete_layouts() -> None:
    from pgflow.log.cursor_rows import inherited_snapshot

    assert inherited_snapshot([]) == "1:1:"
    assert inherited_snapshot([(2, 1, ["50:60:"])]) == "1:1:"  # a shard missing
    got = inherited_snapshot([(2, 2, ["40:70:40,65", "30:55:30,50"])])
    assert got == "30:55:30,40,50"
    pg_vis = {x: x not in (30, 40, 50) and x < 55 for x in range(25, 80)}
    for x, visible in pg_vis.items():  # visible in both originals <=> in the intersection
        in_a = x < 70 and x not in (40, 65)
        in_b = x < 55 and x not in (30, 50)
        assert visible == (in_a and in_b), x


async def test_a_consumer_leaves_an_exhausted_diff_even_with_nothing_new(
    pgflow_dsn: str,
) -> None:
    ids = await _commit_events(pgflow_dsn, 3)

    async def handler(events: list[Event], conn: Any) -> None:
        pass

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(pgflow_dsn, min_size=1, open=False)
    await pool.open(wait=True)
    try:
        key, flt = CursorKey("c"), Filter(STREAM)
        first = await consume_once(pool, key, flt, handler, batch_size=2)
        assert first.position is not None and first.position.upto is not None
        async with pool.connection() as conn:
            await conn.execute("DELETE FROM pgflow.events WHERE id = %s", (ids[2],))
        moved = await consume_once(pool, key, flt, handler, batch_size=2)
        assert moved.outcome is BatchOutcome.EMPTY
        assert moved.position == Position(first.position.upto)
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT upto FROM pgflow.cursors WHERE consumer = 'c'")
            assert await cur.fetchone() == (None,)  # stored: out of the diff
    finally:
        await pool.close()
