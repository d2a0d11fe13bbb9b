"""The connector runner: sharding and order, retries and dead letters, exactly-once."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection

import pgflow
from pgflow.connectors import Ack, ConnectorEvent
from pgflow.log.events import shard_hash
from pgflow.workflow._connectors import consumer_name
from tests._util import wait_until


class S(enum.IntEnum):
    NEW = 1
    DONE = 2


class BroadcastConnector:
    """A broker that delivers every event to every consumer (like a fan-out topic)."""

    def __init__(self, events: list[ConnectorEvent]) -> None:
        self.events = events
        self.acks: dict[str, list[str]] = defaultdict(list)

    async def make(self, consumer_name: str) -> BroadcastConsumer:
        return BroadcastConsumer(self, consumer_name)


class BroadcastConsumer:
    def __init__(self, connector: BroadcastConnector, name: str) -> None:
        self.connector = connector
        self.name = name
        self.next = 0

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        while self.next >= len(self.connector.events):  # noqa: ASYNC110 - a fake broker
            await asyncio.sleep(0.01)
        event = self.connector.events[self.next]
        self.next += 1  # delivered; a new consumer starts over (unacked: redelivered)

        async def ack() -> None:
            self.connector.acks[self.name].append(event.id)

        return event, ack

    async def close(self) -> None:
        return None


def workflow(dsn: str) -> pgflow.Builder[dict[str, Any], S]:
    b = pgflow.Builder("conn", dict, S, polling_frequency=0.1)
    b.add_step(S.NEW, lambda run: S.DONE, S.DONE)
    return b


async def test_sharded_in_order_each_event_once(pgflow_dsn: str) -> None:
    events = [
        ConnectorEvent(id=f"{fid}-{seq}", foreign_id=fid, type="order", headers={"seq": str(seq)})
        for seq in range(5)
        for fid in (f"f{i}" for i in range(12))
    ]
    connector = BroadcastConnector(events)
    handled: dict[str, list[int]] = defaultdict(list)
    shards: dict[str, set[int]] = defaultdict(set)

    async def fn(api: pgflow.API[dict[str, Any], S], event: ConnectorEvent) -> None:
        task = asyncio.current_task()
        assert task is not None
        shards[event.foreign_id].add(int(task.get_name().rsplit(":", 1)[1]))
        handled[event.foreign_id].append(int(event.headers["seq"]))
        if event.headers["seq"] == "0":
            await api.trigger(event.foreign_id, initial={"from": event.id})

    b = workflow(pgflow_dsn)
    b.add_connector("orders-in", connector, fn, parallel_count=3)
    async with b.build(pgflow_dsn) as wf:
        await wait_until(
            lambda: _true(all(len(connector.acks[n]) == len(events) for n in _names(3))),
            message="every consumer acked every event",
        )
        for i in range(12):
            rec = await pgflow.testing.require(wf, f"f{i}", S.DONE)
            assert rec.object == {"from": f"f{i}-0"}
    assert sorted(connector.acks) == sorted(_names(3))
    for fid, seqs in handled.items():
        assert seqs == [0, 1, 2, 3, 4], fid  # in order, each once
        assert shards[fid] == {shard_hash(fid) % 3}
    assert len({s for v in shards.values() for s in v}) == 3  # all shards did work


def _names(n: int) -> list[str]:
    return [consumer_name("conn", "orders-in", i, n) for i in range(n)]


async def _true(value: bool) -> bool:
    return value


async def test_retries_then_dead_letter_without_losing_or_skipping(pgflow_dsn: str) -> None:
    events = [ConnectorEvent(id=f"e{i}", foreign_id=f"x{i}", type="t") for i in range(6)]
    connector = BroadcastConnector(events)
    calls: dict[str, int] = defaultdict(int)
    order: list[str] = []

    async def fn(api: pgflow.API[dict[str, Any], S], event: ConnectorEvent) -> None:
        calls[event.id] += 1
        if event.id == "e2":
            await api.trigger(event.foreign_id)  # rolled back with the failure
            raise RuntimeError("downstream is down")
        if event.id == "e4" and calls["e4"] < 3:
            raise TimeoutError("flaky")
        order.append(event.id)
        await api.trigger(event.foreign_id)

    b = workflow(pgflow_dsn)
    b.add_connector("pay", connector, fn, max_retries=3, err_backoff=timedelta(milliseconds=10))
    async with b.build(pgflow_dsn) as wf:
        await wait_until(
            lambda: _true(len(connector.acks["conn--pay-1-of-1"]) == 6), message="acks"
        )
        assert calls["e2"] == 3 and calls["e4"] == 3
        assert order == ["e0", "e1", "e3", "e4", "e5"]
        assert not await wf.exists("x2")
        assert await wf.exists("x4")
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        cur = await conn.execute(
            "SELECT consumer, event_id, foreign_id, type, reason, attempts FROM pgflow.dead_letters"
        )
        assert await cur.fetchall() == [
            ("conn--pay", "e2", "x2", "t", "RuntimeError: downstream is down", 3)
        ]


async def test_dead_letters_are_scoped_to_the_workflow(pgflow_dsn: str) -> None:
    """Same-named connectors of two workflows dead-letter the same event id: two rows,
    one per workflow (a broker consumer in one, a transactional one in the other)."""
    from pgflow.connectors.memory import Connector as MemoryConnector

    async def fn(api: pgflow.API[dict[str, Any], S], event: ConnectorEvent) -> None:
        raise RuntimeError(f"{api.name} rejects {event.id}")

    same = ConnectorEvent(id="same-id", foreign_id="x", type="t")
    broker = BroadcastConnector([same])
    memory = MemoryConnector([same])
    first = workflow(pgflow_dsn)
    first.add_connector("pay", broker, fn, max_retries=1)
    second = pgflow.Builder("other", dict, S, polling_frequency=0.1)
    second.add_step(S.NEW, lambda run: S.DONE, S.DONE)
    second.add_connector("pay", memory, fn, max_retries=1)

    async def dead_letters() -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute(
                "SELECT consumer, event_id, reason FROM pgflow.dead_letter_queue ORDER BY consumer"
            )
            return await cur.fetchall()

    async def two() -> bool:
        return len(await dead_letters()) == 2

    async with first.build(pgflow_dsn), second.build(pgflow_dsn):
        await wait_until(two, message="one dead letter per workflow")
    assert await dead_letters() == [
        ("conn--pay", "same-id", "RuntimeError: conn rejects same-id"),
        ("other--pay", "same-id", "RuntimeError: other rejects same-id"),
    ]


async def test_consume_lag_and_lag_alert(pgflow_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    now = datetime.now(UTC)
    old = ConnectorEvent(id="old", foreign_id="o", type="t", created_at=now - timedelta(hours=1))
    fresh = ConnectorEvent(id="fresh", foreign_id="f", type="t", created_at=now)
    connector = BroadcastConnector([old, fresh])
    seen: dict[str, datetime] = {}

    async def fn(api: pgflow.API[dict[str, Any], S], event: ConnectorEvent) -> None:
        seen[event.id] = datetime.now(UTC)

    b = workflow(pgflow_dsn)
    b.add_connector(
        "lagged", connector, fn, consume_lag=timedelta(seconds=0.5), lag_alert=timedelta(minutes=1)
    )
    with caplog.at_level(logging.WARNING, logger="pgflow.workflow._connector_batches"):
        async with b.build(pgflow_dsn):
            await wait_until(lambda: _true(len(seen) == 2), message="both handled")
    assert seen["fresh"] - fresh.created_at >= timedelta(seconds=0.5)
    alerts = [r.getMessage() for r in caplog.records if "lag_alert" in r.getMessage()]
    assert len(alerts) == 1 and "event old" in alerts[0]


# -- a transactional source in the same database: exactly-once ---------------------------


class TableSource:
    """Tails table ``src`` by id; the cursor lives in ``src_cursor`` (same database)."""

    async def make(self, consumer_name: str) -> TableConsumer:
        return TableConsumer(consumer_name)


class TableConsumer:
    def __init__(self, name: str) -> None:
        self.name = name

    async def recv_batch_in(
        self, conn: AsyncConnection[Any], limit: int
    ) -> list[tuple[ConnectorEvent, Ack]]:
        cur = await conn.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))", (self.name,))
        row = await cur.fetchone()
        if not row or not row[0]:
            return []
        await conn.execute(
            "INSERT INTO src_cursor VALUES (%s, 0) ON CONFLICT DO NOTHING", (self.name,)
        )
        cur = await conn.execute(
            "SELECT s.id, s.foreign_id, s.created_at FROM src s, src_cursor c"
            " WHERE c.name = %s AND s.id > c.last_id ORDER BY s.id LIMIT %s",
            (self.name, limit),
        )
        out = []
        for id_, foreign_id, created_at in await cur.fetchall():

            async def ack(id_: int = id_) -> None:
                await conn.execute(
                    "UPDATE src_cursor SET last_id = %s WHERE name = %s", (id_, self.name)
                )

            out.append(
                (
                    ConnectorEvent(
                        id=str(id_), foreign_id=foreign_id, type="src", created_at=created_at
                    ),
                    ack,
                )
            )
        return out

    async def close(self) -> None:
        return None


async def test_transactional_consumer_is_exactly_once(pgflow_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE src (id bigserial PRIMARY KEY, foreign_id text,"
            " created_at timestamptz DEFAULT now());"
            "CREATE TABLE src_cursor (name text PRIMARY KEY, last_id bigint);"
            "CREATE TABLE seen (src_id text)"
        )
        await conn.execute(
            "INSERT INTO src (foreign_id) SELECT 'u' || g FROM generate_series(1, 200) g"
        )
    failed_once: set[str] = set()

    async def fn(api: pgflow.API[dict[str, Any], S], event: ConnectorEvent) -> None:
        assert api.conn is not None
        await api.trigger(event.foreign_id, initial={"src": event.id})
        await api.conn.execute("INSERT INTO seen VALUES (%s)", (event.id,))
        if int(event.id) % 17 == 0 and event.id not in failed_once:
            failed_once.add(event.id)
            raise RuntimeError("fail after the trigger and the write: both roll back")

    def build() -> pgflow.Workflow[dict[str, Any], S]:
        b = workflow(pgflow_dsn)
        b.add_connector("src", TableSource(), fn, parallel_count=2, batch_size=25, err_backoff=0.01)
        return b.build(pgflow_dsn)

    async with build() as wf, build():  # two "processes" competing for the shards
        async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO src (foreign_id) SELECT 'v' || g FROM generate_series(1, 50) g"
            )

            async def done() -> bool:
                cur = await conn.execute(
                    "SELECT count(*) FROM pgflow.records WHERE run_state = 'COMPLETED'"
                )
                row = await cur.fetchone()
                return bool(row and row[0] == 250)

            await wait_until(done, timeout=30, message="250 runs completed")
            cur = await conn.execute("SELECT count(*), count(DISTINCT src_id) FROM seen")
            assert await cur.fetchone() == (250, 250)
            cur = await conn.execute("SELECT count(*) FROM pgflow.records")
            assert await cur.fetchone() == (250,)
            cur = await conn.execute("SELECT min(last_id), max(last_id) FROM src_cursor")
            assert await cur.fetchone() == (250, 250)
        rec = await wf.latest("u17")
        assert rec.object == {"src": "17"}
    assert len(failed_once) == 250 // 17


@pytest.mark.parametrize("source", ["memory", "table"])
async def test_same_connector_name_in_two_workflows_each_sees_every_event(
    pgflow_dsn: str, source: str
) -> None:
    """Consumer names are scoped to the workflow: two workflows with a connector called
    ``feed`` on one source keep separate positions, so neither steals the other's events."""
    from pgflow.connectors import table
    from pgflow.connectors.memory import Connector as MemoryConnector

    n = 40
    connector: Any
    if source == "memory":
        connector = MemoryConnector(
            [ConnectorEvent(id=f"e{i}", foreign_id=f"f{i}", type="t") for i in range(n)]
        )
    else:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
            await conn.execute(
                "CREATE TABLE feed (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " tx xid8 NOT NULL DEFAULT pg_current_xact_id(), foreign_id text NOT NULL,"
                " type text NOT NULL)"
            )
            await conn.execute(
                "INSERT INTO feed (foreign_id, type)"
                " SELECT 'f' || (g - 1), 't' FROM generate_series(1, %s) g",
                (n,),
            )
        connector = table.Connector(table.TableStream("feed"), table.CursorStore(pgflow_dsn))

    async def fn(api: pgflow.API[dict[str, Any], S], event: ConnectorEvent) -> None:
        await api.trigger(event.foreign_id, run_id=pgflow.run_id_for(api.name, event.id))

    def build(name: str, parallel_count: int) -> pgflow.Workflow[dict[str, Any], S]:
        b = pgflow.Builder(name, dict, S, polling_frequency=0.1)
        b.add_step(S.NEW, lambda run: S.DONE, S.DONE)
        b.add_connector("feed", connector, fn, parallel_count=parallel_count)
        return b.build(pgflow_dsn)

    async def runs(workflow: str) -> int:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute(
                "SELECT count(DISTINCT foreign_id) FROM pgflow.records WHERE workflow = %s",
                (workflow,),
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    # same parallel_count: unscoped names ("feed-1-of-2") would collide
    names = [consumer_name(wf, "feed", i, 2) for wf in ("wf-a", "wf-b") for i in (0, 1)]

    async def both_done() -> bool:
        if source == "memory" and not all(connector.position(c) == n for c in names):
            return False  # each consumer name moved over every event (settled acks)
        return await runs("wf-a") == n and await runs("wf-b") == n

    try:
        async with build("wf-a", 2), build("wf-b", 2):
            await wait_until(both_done, timeout=30, message="both workflows saw every event")
    finally:
        if source == "table":
            await connector.close()
    if source == "table":
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute(
                "SELECT consumer FROM pgflow.cursors WHERE consumer LIKE 'connector:%%'"
                " ORDER BY consumer"
            )
            cursors = [r[0].rsplit(":", 1)[1] for r in await cur.fetchall()]
        assert cursors == names


async def test_table_batch_stopped_early_commits_its_prefix_exactly_once(
    pgflow_dsn: str,
) -> None:
    """A failure mid-batch: the events before it commit with the cursor (one write by
    the runner's flush_in), so they are not handled again; the failed one is retried."""
    from pgflow.connectors import table

    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE src (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " tx xid8 NOT NULL DEFAULT pg_current_xact_id(), foreign_id text, type text);"
            " CREATE TABLE effects (event_id text NOT NULL);"
            " INSERT INTO src (foreign_id, type) SELECT 'f' || g, 't' FROM generate_series(1, 6) g"
        )
    failed: set[str] = set()

    async def fn(api: pgflow.API[dict[str, Any], S], event: ConnectorEvent) -> None:
        await api.conn.execute("INSERT INTO effects VALUES (%s)", (event.id,))
        if event.id == "4" and "4" not in failed:
            failed.add("4")
            raise RuntimeError("flaky")

    connector = table.Connector(table.TableStream("src"), table.CursorStore(pgflow_dsn))
    b = workflow(pgflow_dsn)
    b.add_connector("src", connector, fn, err_backoff=timedelta(milliseconds=10))

    async def effects() -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute(
                "SELECT event_id, count(*) FROM effects GROUP BY event_id ORDER BY event_id"
            )
            return await cur.fetchall()

    async def all_six() -> bool:
        return len(await effects()) == 6

    try:
        async with b.build(pgflow_dsn):
            await wait_until(all_six, message="every row handled")
    finally:
        await connector.close()
    assert failed == {"4"}
    assert await effects() == [(str(i), 1) for i in range(1, 7)]  # each once


@pytest.mark.parametrize("path", ["broker", "transactional"])
async def test_reject_dead_letters_at_once_without_retries(pgflow_dsn: str, path: str) -> None:
    """A function that raises ``Reject`` (the event can never succeed) is dead-lettered
    on its first attempt, its batch-mates still processed, and nothing is retried."""
    from pgflow.connectors import Reject
    from pgflow.connectors.memory import Connector as MemoryConnector

    events = [ConnectorEvent(id=f"r{i}", foreign_id=f"y{i}", type="t") for i in range(4)]
    connector: Any = BroadcastConnector(events) if path == "broker" else MemoryConnector(events)
    calls: dict[str, int] = defaultdict(int)

    async def fn(api: pgflow.API[dict[str, Any], S], event: ConnectorEvent) -> None:
        calls[event.id] += 1
        if event.id == "r1":
            raise Reject("amount must be positive")
        await api.trigger(event.foreign_id)

    b = workflow(pgflow_dsn)
    b.add_connector("pay", connector, fn, max_retries=5, err_backoff=timedelta(seconds=30))

    async def dead_letters() -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute("SELECT event_id, reason, attempts FROM pgflow.dead_letters")
            return await cur.fetchall()

    async with b.build(pgflow_dsn) as wf:

        async def all_triggered() -> bool:
            return all([await wf.exists(f"y{i}") for i in (0, 2, 3)])

        # err_backoff is 30 s: finishing well within the deadline proves no retry ran.
        await wait_until(all_triggered, timeout=10, message="the other events processed")
        await wait_until(lambda: _true(bool(calls["r1"])), message="r1 seen")
        letters = await wait_until(dead_letters, timeout=10, message="r1 dead-lettered")
        assert not await wf.exists("y1")
    assert letters == [("r1", "Reject: amount must be positive", 1)]
    # One attempt, on both paths: a function that raises in an optimistic batch is
    # not run again (its failure is that attempt), nor are its batch-mates.
    assert dict(calls) == {"r0": 1, "r1": 1, "r2": 1, "r3": 1}
