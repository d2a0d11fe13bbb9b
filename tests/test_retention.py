"""Retention (pgflow.retention / `pgflow prune`): every rule keeps what is still needed.

Each event is its own real transaction (``tx`` cannot be forged: the database stamps
it); cursors are written as snapshot positions directly: ``PAST`` has read everything,
others are built from the events' transaction ids.
"""

from __future__ import annotations

import argparse
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection

from pgflow.cli import main
from pgflow.cli._prune import parse_age
from pgflow.ops.retention import prune

OLD = "now() - interval '40 days'"
NEW = "now()"
PAST = "18446744073709551615:18446744073709551615:"  # a snapshot in which all is visible
DAYS30 = timedelta(days=30)


async def connect(dsn: str) -> AsyncConnection[Any]:
    return await AsyncConnection.connect(dsn, autocommit=True)


async def event(
    conn: AsyncConnection[Any],
    stream: str,
    *,
    age: str = OLD,
    run_id: uuid.UUID | None = None,
) -> int:
    """Insert one event in its own transaction (``conn`` is autocommit)."""
    cur = await conn.execute(
        "INSERT INTO pgflow.events (stream, type, foreign_id, run_id, created_at)"
        f" VALUES (%s, 'step', %s, %s, {age}) RETURNING id",
        (stream, f"f-{run_id or uuid.uuid4()}", run_id),  # a run's events: its record's id
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def tx_of(conn: AsyncConnection[Any], event_id: int) -> int:
    cur = await conn.execute(
        "SELECT tx::text::bigint FROM pgflow.events WHERE id = %s", (event_id,)
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def cursor(
    conn: AsyncConnection[Any],
    name: str,
    stream: str | None,
    snap: str = PAST,
    upto: str | None = None,
    after_id: int = 0,
) -> None:
    await conn.execute(
        "INSERT INTO pgflow.cursors (consumer, shard, shard_count, snap, upto, after_id, stream)"
        " VALUES (%s, 0, 1, %s, %s, %s, %s)",
        (name, snap, upto, after_id, stream),
    )


async def record(conn: AsyncConnection[Any], workflow: str, run_state: str) -> uuid.UUID:
    rid = uuid.uuid4()
    await conn.execute(
        "INSERT INTO pgflow.records (run_id, workflow, foreign_id, status, run_state)"
        " VALUES (%s, %s, %s, 'x', %s)",
        (rid, workflow, f"f-{rid}", run_state),
    )
    return rid


async def remaining(conn: AsyncConnection[Any]) -> set[int]:
    cur = await conn.execute("SELECT id FROM pgflow.events")
    return {int(r[0]) for r in await cur.fetchall()}


async def test_old_consumed_events_go_young_ones_stay(pgflow_dsn: str) -> None:
    async with await connect(pgflow_dsn) as conn:
        await cursor(conn, "c", "s")
        old = await event(conn, "s")
        young = await event(conn, "s", age=NEW)
        other = await event(conn, "t", age="now() - interval '10 days'")
        await cursor(conn, "ct", "t")
        result = await prune(conn, older_than=DAYS30)
        assert result.events_by_stream == {"s": 1}
        assert result.batches >= 1 and not result.dry_run
        assert await remaining(conn) == {young, other}
        assert old not in await remaining(conn)
        # A shorter retention takes the 10-day-old one too, never the young one.
        result = await prune(conn, older_than=timedelta(days=5))
        assert result.events_by_stream == {"t": 1}
        assert await remaining(conn) == {young}


async def test_lagging_cursor_keeps_what_it_has_not_read(pgflow_dsn: str) -> None:
    async with await connect(pgflow_dsn) as conn:
        e1 = await event(conn, "s")
        await conn.execute("BEGIN")
        e2 = await event(conn, "s")
        e3 = await event(conn, "s")
        await conn.execute("COMMIT")
        t2 = await tx_of(conn, e2)
        await cursor(conn, "fast", "s")
        # "slow" sees e1 and is inside the diff of e2/e3's transaction, after e2.
        await cursor(conn, "slow", "s", f"{t2}:{t2}:", f"{t2 + 1}:{t2 + 1}:", e2)
        result = await prune(conn, older_than=DAYS30)
        assert result.events == 2
        assert await remaining(conn) == {e3}
        assert e1 not in await remaining(conn)


async def test_cursors_of_other_streams_or_none_say_nothing_about_a_stream(
    pgflow_dsn: str,
) -> None:
    """0.1 took a NULL-stream cursor (a table connector's) as reading every stream, and
    deleted events nobody had read (e.g. replayed dead letters on ``pgflow.replay``)."""
    async with await connect(pgflow_dsn) as conn:
        replayed = await event(conn, "pgflow.replay")
        e1 = await event(conn, "s")
        await cursor(conn, "own", "s")
        await cursor(conn, "connector:app.t:c", None)  # a table connector: PAST everything
        await cursor(conn, "other", "t")
        result = await prune(conn, older_than=DAYS30)
        assert result.events_by_stream == {"s": 1}
        assert await remaining(conn) == {replayed}
        assert e1 not in await remaining(conn)


async def test_stream_without_cursor_is_kept_unless_asked(pgflow_dsn: str) -> None:
    async with await connect(pgflow_dsn) as conn:
        orphan = await event(conn, "nobody-reads-this")
        assert (await prune(conn, older_than=DAYS30)).events == 0
        assert await remaining(conn) == {orphan}
        dry = await prune(conn, older_than=DAYS30, include_unconsumed=True, dry_run=True)
        assert dry.events_by_stream == {"nobody-reads-this": 1}
        assert await remaining(conn) == {orphan}
        result = await prune(conn, older_than=DAYS30, include_unconsumed=True)
        assert result.events_by_stream == {"nobody-reads-this": 1}
        assert await remaining(conn) == set()


async def test_events_of_runs_in_progress_are_kept(pgflow_dsn: str) -> None:
    async with await connect(pgflow_dsn) as conn:
        await cursor(conn, "c", "wf")
        kept, gone = set(), set()
        for state in ("INITIATED", "RUNNING", "PAUSED", "REQUESTED_DATA_DELETED"):
            kept.add(await event(conn, "wf", run_id=await record(conn, "wf", state)))
        for state in ("COMPLETED", "CANCELLED", "DATA_DELETED"):
            gone.add(await event(conn, "wf", run_id=await record(conn, "wf", state)))
        gone.add(await event(conn, "wf", run_id=uuid.uuid4()))  # its record was deleted
        gone.add(await event(conn, "wf"))  # not a run's event
        result = await prune(conn, older_than=DAYS30)
        assert result.events_by_stream == {"wf": len(gone)}
        assert await remaining(conn) == kept
        # History of the kept runs is still in run_history; the pruned ones have none.
        cur = await conn.execute("SELECT count(*) FROM pgflow.run_history")
        assert (await cur.fetchone()) == (len(kept),)


async def test_events_a_cursor_has_not_read_are_kept_however_old(pgflow_dsn: str) -> None:
    """An event committed late (its transaction was open when the cursor's snapshot was
    taken) is not read yet and must stay, however old it looks."""
    async with await connect(pgflow_dsn) as conn, await connect(pgflow_dsn) as holder:
        await holder.execute("BEGIN")
        await holder.execute(
            "INSERT INTO pgflow.events (stream, type, foreign_id, created_at)"
            f" VALUES ('s', 'step', 'h', {OLD})"
        )
        committed = await event(conn, "s")
        cur = await conn.execute("SELECT pg_current_snapshot()::text")
        snap = (await cur.fetchone() or [""])[0]
        await cursor(conn, "c", "s", snap)  # has read `committed`, not the open one
        await holder.execute("COMMIT")
        assert (await prune(conn, older_than=DAYS30)).events == 1
        assert committed not in await remaining(conn)
        assert len(await remaining(conn)) == 1  # the late one, unread, stays
        await conn.execute("UPDATE pgflow.cursors SET snap = pg_current_snapshot()")
        assert (await prune(conn, older_than=DAYS30)).events == 1
        assert await remaining(conn) == set()


async def test_an_idle_consumer_does_not_hold_its_stream_back(pgflow_dsn: str) -> None:
    """A step whose status no run reaches kept its cursor at the start forever, so 0.1
    never pruned the workflow's stream; an idle consumer now moves its snapshot."""
    from psycopg_pool import AsyncConnectionPool

    from pgflow.log.cursors import CursorKey, consume_once, ensure_cursor
    from pgflow.log.streamer import Filter

    async with await connect(pgflow_dsn) as conn:
        e1 = await event(conn, "wf")
        busy, idle = CursorKey("wf/A"), CursorKey("wf/B")
        await ensure_cursor(conn, busy, Filter("wf", ("step",)))
        await ensure_cursor(conn, idle, Filter("wf", ("never",)))
        await conn.execute("UPDATE pgflow.cursors SET updated_at = now() - interval '1 hour'")
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(pgflow_dsn, min_size=1, open=False)
        await pool.open(wait=True)

        async def noop(events: Any, c: Any) -> None:
            pass

        try:
            await consume_once(pool, busy, Filter("wf", ("step",)), noop)
            assert (await prune(conn, older_than=DAYS30)).events == 0  # idle holds it
            await consume_once(pool, idle, Filter("wf", ("never",)), noop)
        finally:
            await pool.close()
        assert (await prune(conn, older_than=DAYS30)).events == 1
        assert e1 not in await remaining(conn)


async def test_dry_run_deletes_nothing_and_counts_what_would_go(pgflow_dsn: str) -> None:
    async with await connect(pgflow_dsn) as conn:
        await cursor(conn, "c", "s")
        for _ in range(5):
            await event(conn, "s")
        await side_tables(conn)
        before = await counts(conn)
        dry = await prune(conn, older_than=DAYS30, dry_run=True, batch=2)
        assert dry.dry_run and dry.batches == 0
        assert await counts(conn) == before
        real = await prune(conn, older_than=DAYS30, batch=2)
        assert (dry.events_by_stream, dry.timeouts, dry.dead_letters) == (
            real.events_by_stream,
            real.timeouts,
            real.dead_letters,
        )
        assert real.events_by_stream == {"s": 5}
        assert real.batches == 3  # 2 + 2 + 1: every batch its own transaction


async def side_tables(conn: AsyncConnection[Any]) -> dict[str, int]:
    """Timeouts and dead letters, old and young, done and not: the ids that must stay."""
    done = await record(conn, "wf", "COMPLETED")
    live = await record(conn, "wf", "RUNNING")
    keep: dict[str, int] = {}

    async def timeout(run: uuid.UUID, status: str, completed: bool, age: str) -> int:
        cur = await conn.execute(
            "INSERT INTO pgflow.timeouts (workflow, foreign_id, run_id, status, version,"
            f" expire_at, completed, created_at) VALUES ('wf', 'f', %s, %s, 1, {age}, %s, {age})"
            " RETURNING id",
            (run, status, completed),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def dead(event_id: str, replayed: str | None) -> int:
        cur = await conn.execute(
            "INSERT INTO pgflow.dead_letters (consumer, event_id, reason, created_at,"
            f" replayed_at) VALUES ('c', %s, 'boom', {OLD}, {replayed or 'NULL'}) RETURNING id",
            (event_id,),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    await timeout(done, "a", True, OLD)  # fired long ago, run finished: goes
    await timeout(uuid.uuid4(), "a", True, OLD)  # fired long ago, run gone: goes
    keep["timeout of a live run"] = await timeout(live, "b", True, OLD)
    keep["pending timeout"] = await timeout(done, "c", False, OLD)
    keep["young timeout"] = await timeout(done, "d", True, NEW)
    await dead("1", OLD)  # replayed long ago: goes
    keep["pending dead letter"] = await dead("2", None)
    keep["recently replayed"] = await dead("3", NEW)
    return keep


async def counts(conn: AsyncConnection[Any]) -> tuple[Any, ...]:
    cur = await conn.execute(
        "SELECT (SELECT count(*) FROM pgflow.events), (SELECT count(*) FROM pgflow.timeouts),"
        " (SELECT count(*) FROM pgflow.dead_letters)"
    )
    row = await cur.fetchone()
    assert row is not None
    return tuple(row)


async def test_timeouts_and_dead_letters(pgflow_dsn: str) -> None:
    async with await connect(pgflow_dsn) as conn:
        keep = await side_tables(conn)
        result = await prune(conn, older_than=DAYS30, batch=1)
        assert (result.timeouts, result.dead_letters) == (2, 1)
        cur = await conn.execute("SELECT id FROM pgflow.timeouts ORDER BY id")
        timeouts = [r[0] for r in await cur.fetchall()]
        assert timeouts == [
            keep["timeout of a live run"],
            keep["pending timeout"],
            keep["young timeout"],
        ]
        cur = await conn.execute("SELECT id FROM pgflow.dead_letters ORDER BY id")
        assert [r[0] for r in await cur.fetchall()] == [
            keep["pending dead letter"],
            keep["recently replayed"],
        ]


async def test_bad_arguments_and_connection_in_a_transaction(pgflow_dsn: str) -> None:
    with pytest.raises(ValueError, match="positive"):
        await prune(pgflow_dsn, older_than=timedelta(0))
    with pytest.raises(ValueError, match="batch"):
        await prune(pgflow_dsn, older_than=DAYS30, batch=0)
    async with await AsyncConnection.connect(pgflow_dsn) as conn:
        await conn.execute("SELECT 1")  # implicit transaction open
        with pytest.raises(ValueError, match="not inside a transaction"):
            await prune(conn, older_than=DAYS30)
    # A DSN works too (its own connection).
    assert (await prune(pgflow_dsn, older_than=DAYS30)).events == 0


# ------------------------------------------------------------------ the CLI
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
    ],
)
def test_parse_age(text: str, expected: timedelta) -> None:
    assert parse_age(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "30x", "-5d", "0d", "1.5h", "30 days", "3d4h"])
def test_parse_age_rejects_garbage(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"e\.g\. 30d, 12h, 90m"):
        parse_age(text)


def test_cli_rejects_garbage_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--older-than", "soon", "--dsn", "postgresql://x@127.0.0.1/none"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid age 'soon'" in err and "30d, 12h, 90m" in err
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--dsn", "postgresql://x@127.0.0.1/none"])  # --older-than required
    assert exc.value.code == 2


def test_cli_without_database_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PGFLOW_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["prune", "--older-than", "30d"]) == 1
    assert "no database given" in capsys.readouterr().err


def test_cli_dry_run_then_prune(pgflow_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgflow.cursors (consumer, shard, shard_count, snap, stream)"
            f" VALUES ('c', 0, 1, '{PAST}', 'orders')"
        )
        conn.execute(
            "INSERT INTO pgflow.events (stream, type, foreign_id, created_at)"
            f" SELECT 'orders', 'step', 'f' || g, {OLD} FROM generate_series(1, 3) g"
        )
    assert main(["prune", "--older-than", "30d", "--dry-run", "--dsn", pgflow_dsn]) == 0
    out = capsys.readouterr().out
    assert "would delete" in out and "orders: 3" in out
    with psycopg.connect(pgflow_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pgflow.events").fetchone() == (3,)
    assert main(["prune", "--older-than", "720h", "--dsn", pgflow_dsn]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deleted") and "events total: 3" in out
    with psycopg.connect(pgflow_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pgflow.events").fetchone() == (0,)


async def test_change_log_is_pruned_behind_its_readers_only(pgflow_dsn: str) -> None:
    """pgflow.changes rows go once every connector reading the change log has read
    them; a reader that has not, or no reader at all, keeps them."""

    async def change(conn: AsyncConnection[Any], pk: str) -> int:
        cur = await conn.execute(
            "INSERT INTO pgflow.changes (table_name, op, pk, created_at)"
            f" VALUES ('app.t', 'INSERT', %s, {OLD}) RETURNING id",
            (pk,),
        )
        return int((await cur.fetchone() or [0])[0])

    async def change_rows(conn: AsyncConnection[Any]) -> set[int]:
        cur = await conn.execute("SELECT id FROM pgflow.changes")
        return {int(r[0]) for r in await cur.fetchall()}

    async with await connect(pgflow_dsn) as conn:
        first = await change(conn, "1")
        cur = await conn.execute("SELECT pg_current_snapshot()::text")
        after_first = (await cur.fetchone() or [""])[0]
        second = await change(conn, "2")
        assert (await prune(conn, older_than=DAYS30)).changes == 0  # nobody reads it yet
        await conn.execute(
            "INSERT INTO pgflow.cursors (consumer, shard, shard_count, snap, source)"
            " VALUES ('connector:changes:a', 0, 1, %s, 'pgflow.changes'),"
            " ('connector:changes:b', 0, 1, %s, 'pgflow.changes')",
            (PAST, after_first),
        )
        dry = await prune(conn, older_than=DAYS30, dry_run=True)
        assert dry.changes == 1 and await change_rows(conn) == {first, second}
        assert (await prune(conn, older_than=DAYS30)).changes == 1
        assert await change_rows(conn) == {second}  # b has not read it
        await conn.execute("UPDATE pgflow.cursors SET snap = %s", (PAST,))
        assert (await prune(conn, older_than=DAYS30)).changes == 1
        assert await change_rows(conn) == set()


async def test_a_table_connector_records_the_table_it_reads(pgflow_dsn: str) -> None:
    from psycopg_pool import AsyncConnectionPool

    from pgflow.connectors import table
    from pgflow.connectors.capture import capture, changes_stream

    async with await connect(pgflow_dsn) as conn:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        await capture(conn, "t")
        await conn.execute("INSERT INTO t VALUES (1)")
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(pgflow_dsn, min_size=1, open=False)
    await pool.open(wait=True)
    try:
        consumer = await table.Connector(changes_stream("t"), table.CursorStore(pool)).make(
            "reader"
        )
        async with pool.connection() as conn, conn.transaction():
            batch = await consumer.recv_batch_in(conn, 10)
            assert len(batch) == 1
            await batch[0][1]()
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT source FROM pgflow.cursors")
            assert await cur.fetchall() == [("pgflow.changes",)]
    finally:
        await pool.close()


async def test_an_idle_change_log_reader_does_not_hold_the_change_log_back(
    pgflow_dsn: str,
) -> None:
    """A connector reading the change log for a table that does not change must still
    let other tables' old change rows go: idle, it moves its position forwards."""
    from psycopg_pool import AsyncConnectionPool

    from pgflow.connectors import table
    from pgflow.connectors.capture import capture, changes_stream

    async with await connect(pgflow_dsn) as conn:
        await conn.execute("CREATE TABLE quiet (id int PRIMARY KEY)")
        await conn.execute("CREATE TABLE busy (id int PRIMARY KEY)")
        await capture(conn, "quiet")
        await capture(conn, "busy")
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(pgflow_dsn, min_size=1, open=False)
    await pool.open(wait=True)
    try:
        quiet = await table.Connector(changes_stream("quiet"), table.CursorStore(pool)).make("q")
        async with pool.connection() as conn, conn.transaction():
            assert await quiet.recv_batch_in(conn, 10) == []  # creates its cursor, idle
        async with await connect(pgflow_dsn) as conn:
            await conn.execute("INSERT INTO busy VALUES (1)")
            await conn.execute(f"UPDATE pgflow.changes SET created_at = {OLD}")
            assert (await prune(conn, older_than=DAYS30)).changes == 0  # quiet has not read it
        quiet._idle_moved_at -= 3600  # as if the idle interval had passed
        async with pool.connection() as conn, conn.transaction():
            assert await quiet.recv_batch_in(conn, 10) == []
        async with await connect(pgflow_dsn) as conn:
            assert (await prune(conn, older_than=DAYS30)).changes == 1
    finally:
        await pool.close()
