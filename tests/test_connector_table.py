"""The table connector against real PostgreSQL: gap-free tailing, transactional acks
(exactly-once), plain recv (at-least-once), bad rows, and a SIGKILLed worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import psycopg
import pytest

from pgflow.connectors import MalformedEvent, TransactionalConsumer, table
from pgflow.connectors.table import CursorStore, TableStream, add_tx_column
from pgflow.log.cursors import LostCursor
from pgflow.log.snapshots import CONSUMED
from tests._util import take_batch, wait_until

PAYMENTS = """
CREATE SCHEMA app;
CREATE TABLE app.payments (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
    foreign_id text,
    type text NOT NULL DEFAULT 'payment.completed',
    amount numeric NOT NULL DEFAULT 10,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON app.payments (tx, id);
CREATE TABLE app.effects (event_id text NOT NULL, foreign_id text NOT NULL);
"""


async def _setup(dsn: str, rows: int = 0) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(PAYMENTS)
        if rows:
            await conn.execute(
                "INSERT INTO app.payments (foreign_id, amount) SELECT 'order-' || g, g"
                " FROM generate_series(1, %s) g",
                (rows,),
            )


async def _cursor(dsn: str, name: str) -> tuple[int, int] | None:
    """(0, the largest payment id the cursor has read), None without a cursor row."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        read = await _cursor_in(conn, name)
        return None if read is None else (0, read)


async def test_transactional_ack_commits_with_effects(pgflow_dsn: str, pool: Any) -> None:
    await _setup(pgflow_dsn, rows=5)
    conn_ = table.Connector(TableStream("app.payments"), CursorStore(pool))
    consumer = await conn_.make("payments")
    assert isinstance(consumer, TransactionalConsumer)

    # A rolled-back batch leaves the cursor where it was.
    batch = await take_batch(consumer, pool, 3, commit=False, limit=3)
    assert [e.foreign_id for e in batch] == ["order-1", "order-2", "order-3"]
    assert await _cursor(pgflow_dsn, "payments") is None

    seen: list[str] = []
    for _ in range(2):
        async with pool.connection() as conn, conn.transaction():
            for ev, ack in await consumer.recv_batch_in(conn, 3):
                await conn.execute(
                    "INSERT INTO app.effects VALUES (%s, %s)", (ev.id, ev.foreign_id)
                )
                seen.append(ev.id)
                await ack()
    assert seen == ["1", "2", "3", "4", "5"]
    async with pool.connection() as conn, conn.transaction(force_rollback=True):
        assert await consumer.recv_batch_in(conn, 10) == []
    pos = await _cursor(pgflow_dsn, "payments")
    assert pos is not None and pos[1] == 5


async def _cursor_in(conn: Any, name: str) -> int | None:
    """The largest payment id the cursor has read (0: none), None without a cursor row."""
    cur = await conn.execute(
        "SELECT (SELECT coalesce(max(e.id), 0) FROM app.payments e WHERE"
        f" {CONSUMED}) FROM pgflow.cursors c WHERE c.consumer = %s",
        ("connector:app.payments:" + name,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else None


async def test_acks_write_the_cursor_once_per_batch(pgflow_dsn: str, pool: Any) -> None:
    """Acks only count in memory; the last ack or flush_in writes one compare-and-set."""
    await _setup(pgflow_dsn, rows=5)
    consumer = await table.Connector(TableStream("app.payments"), CursorStore(pool)).make("f")
    await take_batch(consumer, pool, 5, commit=False, limit=10)  # wait for the rows to be readable

    async with pool.connection() as conn, conn.transaction():
        batch = await consumer.recv_batch_in(conn, 5)
        with pytest.raises(RuntimeError, match="in order"):
            await batch[1][1]()  # skipping event 0 would pass it unhandled
        await batch[0][1]()
        await batch[0][1]()  # twice: harmless
        await batch[1][1]()
        assert await _cursor_in(conn, "f") is None  # nothing written yet
        await consumer.flush_in(conn)  # the runner's hook before commit (stopped early)
        assert await _cursor_in(conn, "f") == 2
    # A rolled-back batch leaves nothing advanced: the next one starts at 3 again.
    async with pool.connection() as conn, conn.transaction(force_rollback=True):
        batch = await consumer.recv_batch_in(conn, 5)
        assert [e.id for e, _ in batch] == ["3", "4", "5"]
        for _, ack in batch:
            await ack()
        assert await _cursor_in(conn, "f") == 5  # the last ack wrote it
    # Someone else moves the cursor: the flush fails, which rolls the batch back.
    with pytest.raises(LostCursor):
        async with pool.connection() as conn, conn.transaction():
            batch = await consumer.recv_batch_in(conn, 5)
            assert [e.id for e, _ in batch] == ["3", "4", "5"]
            await conn.execute("INSERT INTO app.effects VALUES ('3', 'lost')")
            await batch[0][1]()
            async with pool.connection() as other:
                await other.execute(
                    "UPDATE pgflow.cursors SET after_id = 4 WHERE consumer = %s",
                    ("connector:app.payments:f",),
                )
            await consumer.flush_in(conn)
    with pytest.raises(RuntimeError, match="is over"):
        await batch[1][1]()
    pos = await _cursor(pgflow_dsn, "f")
    assert pos is not None and pos[1] == 4  # where the other writer put it
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM app.effects")
        assert await cur.fetchone() == (0,)  # the batch's effects rolled back with it


async def test_default_translator_fields_and_headers(pgflow_dsn: str, pool: Any) -> None:
    await _setup(pgflow_dsn, rows=1)
    consumer = await table.Connector(TableStream("app.payments"), CursorStore(pool)).make("t")
    [ev] = await take_batch(consumer, pool, 1, commit=False, limit=10)
    assert (ev.id, ev.foreign_id, ev.type) == ("1", "order-1", "payment.completed")
    assert ev.headers == {"amount": "1"}  # not id/tx/foreign_id/type/created_at
    assert ev.created_at.tzinfo is not None


async def test_one_owner_per_consumer_name(pgflow_dsn: str, pool: Any) -> None:
    await _setup(pgflow_dsn, rows=2)
    connector = table.Connector(TableStream("app.payments"), CursorStore(pool))
    a, b = await connector.make("same"), await connector.make("same")
    await take_batch(a, pool, 2, commit=False, limit=10)
    async with pool.connection() as c1, c1.transaction():
        assert len(await a.recv_batch_in(c1, 10)) == 2
        async with pool.connection() as c2, c2.transaction():
            assert await b.recv_batch_in(c2, 10) == []  # locked by a's transaction


async def test_late_commit_is_not_skipped(pgflow_dsn: str, pool: Any) -> None:
    """A row with a smaller id that commits after a bigger one is still delivered."""
    await _setup(pgflow_dsn)
    consumer = await table.Connector(TableStream("app.payments"), CursorStore(pool)).make("g")
    slow = await psycopg.AsyncConnection.connect(pgflow_dsn)
    try:
        await slow.execute("INSERT INTO app.payments (foreign_id) VALUES ('slow')")  # id 1
        async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as fast:
            await fast.execute("INSERT INTO app.payments (foreign_id) VALUES ('fast')")  # id 2
        # 'fast' is read at once (0.1 held it back while 'slow' was open)...
        got = await take_batch(consumer, pool, 1, limit=10)
        assert [e.foreign_id for e in got] == ["fast"]
        await slow.commit()
        # ...and 'slow', with the smaller id, once it has committed: not skipped.
        got = await take_batch(consumer, pool, 1, limit=10)
        assert [e.foreign_id for e in got] == ["slow"]
    finally:
        await slow.close()


async def test_malformed_row_is_reported_with_an_ack(pgflow_dsn: str, pool: Any) -> None:
    await _setup(pgflow_dsn)
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO app.payments (foreign_id) VALUES ('ok-1'), (NULL), ('ok-2')"
        )
    consumer = await table.Connector(TableStream("app.payments"), CursorStore(pool)).make("m")
    got = await take_batch(consumer, pool, 1, limit=10)  # the batch stops before the bad row
    assert [e.foreign_id for e in got] == ["ok-1"]
    async with pool.connection() as conn, conn.transaction():
        with pytest.raises(MalformedEvent) as info:
            await consumer.recv_batch_in(conn, 10)
        assert "foreign_id" in info.value.reason and info.value.event_id == "app.payments:2"
        assert info.value.payload["amount"] == "10"
        await info.value.ack()  # the runner dead-letters it, then acks in its transaction
    assert [e.foreign_id for e in await take_batch(consumer, pool, 1, limit=10)] == ["ok-2"]


async def test_plain_recv_is_at_least_once(pgflow_dsn: str, pool: Any) -> None:
    await _setup(pgflow_dsn, rows=3)
    connector = table.Connector(
        TableStream("app.payments"), CursorStore(pgflow_dsn), poll_interval=0.05
    )
    try:
        c = await connector.make("plain")
        _, ack1 = await c.recv()
        await ack1()
        ev2, _ = await c.recv()  # "crash" before acking ev2
        await c.close()
        c2 = await connector.make("plain")
        again, ack = await c2.recv()
        assert again.id == ev2.id == "2"
        await ack()
        ev3, ack3 = await c2.recv()
        await ack3()
        assert ev3.id == "3"
        # recv waits for new rows (polling) and gets them
        waiting = asyncio.create_task(c2.recv())
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO app.payments (foreign_id) VALUES ('late')")
        ev4, ack4 = await asyncio.wait_for(waiting, 30)
        assert ev4.foreign_id == "late"
        await ack4()
        assert await _cursor(pgflow_dsn, "plain") is not None
        pos = await _cursor(pgflow_dsn, "plain")
        assert pos is not None and pos[1] == 4
    finally:
        await connector.close()


async def test_query_stream_with_where_and_custom_translator(pgflow_dsn: str, pool: Any) -> None:
    await _setup(pgflow_dsn, rows=6)
    stream = TableStream(
        query="SELECT p.id, p.tx, p.foreign_id, p.amount FROM app.payments p",
        where="s.amount >= %(min)s",
        params={"min": 4},
    )

    def translate(row: Any) -> Any:
        from pgflow.connectors import ConnectorEvent

        return ConnectorEvent(
            f"p{row['id']}", row["foreign_id"], "big", {"amt": str(row["amount"])}
        )

    consumer = await table.Connector(stream, CursorStore(pool), translate).make("q")
    batch = await take_batch(consumer, pool, 3, commit=False, limit=10)
    assert [(e.id, e.type, e.headers["amt"]) for e in batch] == [
        ("p4", "big", "4"),
        ("p5", "big", "5"),
        ("p6", "big", "6"),
    ]


async def test_id_only_source_and_add_tx_column(pgflow_dsn: str, pool: Any) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "CREATE TABLE legacy (id bigint PRIMARY KEY, foreign_id text, type text)"
        )
        await conn.execute("INSERT INTO legacy VALUES (1, 'a', 't'), (2, 'b', 't')")
    id_only = table.Connector(TableStream("legacy", tx_column=None), CursorStore(pool))
    consumer = await id_only.make("legacy-ids")
    async with pool.connection() as conn, conn.transaction():
        batch = await consumer.recv_batch_in(conn, 10)
        assert [e.foreign_id for e, _ in batch] == ["a", "b"]
        for _, ack in batch:
            await ack()
    # Upgrade the source to gap-free tailing.
    await add_tx_column(pgflow_dsn, "legacy")
    await add_tx_column(pgflow_dsn, "legacy")  # idempotent
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO legacy VALUES (3, 'c', 't')")
    gap_free = await table.Connector(TableStream("public.legacy"), CursorStore(pool)).make("g")
    batch = await take_batch(gap_free, pool, 3, commit=False, limit=10)
    assert [e.foreign_id for e in batch] == ["a", "b", "c"]


def test_stream_description_is_validated() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TableStream()
    with pytest.raises(ValueError, match="bad table name"):
        TableStream("a.b.c")


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import psycopg
    from pgflow.connectors import table

    async def main(dsn):
        connector = table.Connector(table.TableStream("app.payments"), table.CursorStore(dsn))
        consumer = await connector.make("killme")
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            while True:
                async with conn.transaction():
                    batch = await consumer.recv_batch_in(conn, 7)
                    for ev, ack in batch:
                        await conn.execute(
                            "INSERT INTO app.effects VALUES (%s, %s)", (ev.id, ev.foreign_id)
                        )
                        await ack()
                if not batch:
                    await asyncio.sleep(0.01)
                else:
                    print("batch", flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_exactly_once_across_sigkill_of_the_worker(pgflow_dsn: str, pool: Any) -> None:
    await _setup(pgflow_dsn)
    total = 600

    async def writer(offset: int) -> None:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as c:
            for i in range(offset, total, 3):
                await c.execute("INSERT INTO app.payments (foreign_id) VALUES (%s)", (f"o{i}",))

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, pgflow_dsn],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )

    async def effects() -> int:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM app.effects")
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    first = spawn()
    writers = asyncio.gather(*(writer(k) for k in range(3)))  # concurrent writers
    try:
        await wait_until(lambda: _gt(effects, 50), timeout=30, message="first effects")
        first.send_signal(signal.SIGKILL)  # mid-stream, possibly mid-transaction
        first.wait(10)
        second = spawn()
        try:
            await writers
            await wait_until(lambda: _eq(effects, total), timeout=60, message="all effects")
        finally:
            second.kill()
            second.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*), count(DISTINCT event_id) FROM app.effects")
        assert await cur.fetchone() == (total, total)  # all, and none twice


async def _gt(f: Any, n: int) -> bool:
    return bool(await f() > n)


async def _eq(f: Any, n: int) -> bool:
    return bool(await f() >= n)


async def test_a_new_parallel_count_starts_where_the_old_layout_had_read(
    pgflow_dsn: str, pool: Any
) -> None:
    """A workflow connector's shards are cursors named ``…-<i>-of-<n>``: changing
    ``parallel_count`` makes new names, which start where every shard of the old,
    complete layout had read instead of re-reading the whole source."""
    import enum

    import pgflow

    class S(enum.IntEnum):
        NEW = 1
        DONE = 2

    await _setup(pgflow_dsn, rows=6)
    calls: list[str] = []

    async def fn(api: Any, event: Any) -> None:
        calls.append(event.id)

    def build(parallel_count: int) -> Any:
        b = pgflow.Builder("layouts", dict, S, polling_frequency=0.05)
        b.add_step(S.NEW, lambda run: S.DONE, S.DONE)
        b.add_connector(
            "pay",
            table.Connector(TableStream("app.payments"), CursorStore(pool), poll_interval=0.05),
            fn,
            parallel_count=parallel_count,
        )
        return b.build(pgflow_dsn)

    async with build(1):
        await wait_until(_true_when(lambda: len(calls) == 6), message="first layout read all")
    assert sorted(calls, key=int) == [str(i) for i in range(1, 7)]
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO app.payments (foreign_id) VALUES ('new-1'), ('new-2')")
    async with build(2):
        await wait_until(_true_when(lambda: len(calls) == 8), message="new rows read")
        await asyncio.sleep(0.3)  # the new shards had every chance to re-read old rows
    assert sorted(calls, key=int) == [str(i) for i in range(1, 9)]  # each row once
    async with pool.connection() as conn:  # inherited rows record what they read too
        cur = await conn.execute(
            "SELECT DISTINCT source FROM pgflow.cursors WHERE consumer LIKE 'connector:%'"
        )
        assert await cur.fetchall() == [("app.payments",)]


def _true_when(check: Any) -> Any:
    async def predicate() -> bool:
        return bool(check())

    return predicate
