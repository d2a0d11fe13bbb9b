"""Broker connectors batch: the events a broker consumer already holds go through one
transaction (the optimistic batch machinery), and are acked in order after its commit.

Transactions are counted by the ``xmin`` of the runs' records: a callback (not a step)
waits on NEW, so no record is updated after the transaction that inserted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow.connectors import Ack, ConnectorEvent, MalformedEvent, Reject
from pgflow.connectors.memory import Connector as MemoryConnector
from pgflow.connectors.memory import event
from tests._util import wait_until

REDIS = "redis://127.0.0.1:6379"


class S(enum.IntEnum):
    NEW = 1
    DONE = 2


async def _noop(run: Any, payload: Any) -> None:
    return None


def build(dsn: str, connector: Any, fn: Any, **options: Any) -> pgflow.Workflow[Any, S]:
    b: pgflow.Builder[dict[str, Any], S] = pgflow.Builder("bb", dict, S)
    b.add_callback(S.NEW, _noop, S.DONE)
    options = {"batch_size": 100, "err_backoff": 0.02, **options}
    b.add_connector("feed", connector, fn, **options)
    return b.build(dsn)


def trigger_fn(calls: Counter[str]) -> Any:
    async def fn(api: pgflow.API[dict[str, Any], S], ev: ConnectorEvent) -> None:
        calls[ev.id] += 1
        await api.trigger(ev.foreign_id, {"id": ev.id}, run_id=pgflow.run_id_for("bb", ev.id))

    return fn


async def _runs(dsn: str) -> tuple[dict[str, int], int]:
    """(runs per payload event id, distinct inserting transactions)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT object->>'id', count(*) FROM pgflow.records WHERE workflow = 'bb' GROUP BY 1"
        )
        runs = {eid: n for eid, n in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT count(DISTINCT xmin::text) FROM pgflow.records WHERE workflow = 'bb'"
        )
        row = await cur.fetchone()
        assert row is not None
        return runs, int(row[0])


async def _dead_letters(dsn: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT event_id, attempts FROM pgflow.dead_letters")
        return {eid: n for eid, n in await cur.fetchall()}


class Watched:
    """Wraps a connector: records each ack (in order) and, when it happens, whether the
    event's effect (its run, or its dead letter) is already committed — seen from
    another connection. ``drop_acks`` simulates a crash between commit and ack."""

    def __init__(self, inner: Any, dsn: str, *, drop_acks: bool = False) -> None:
        self.inner = inner
        self.dsn = dsn
        self.drop_acks = drop_acks
        self.acked: list[str] = []
        self.uncommitted_acks: list[str] = []

    async def make(self, consumer_name: str) -> Any:
        return _WatchedConsumer(self, await self.inner.make(consumer_name))

    async def committed(self, event_id: str) -> bool:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT EXISTS (SELECT FROM pgflow.records WHERE object->>'id' = %s)"
                " OR EXISTS (SELECT FROM pgflow.dead_letters WHERE event_id = %s)",
                (event_id, event_id),
            )
            row = await cur.fetchone()
            return bool(row and row[0])


class _WatchedConsumer:
    def __init__(self, watched: Watched, inner: Any) -> None:
        self.watched = watched
        self.inner = inner

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        ev, ack = await self.inner.recv()

        async def watched_ack() -> None:
            if not await self.watched.committed(ev.id):
                self.watched.uncommitted_acks.append(ev.id)
            self.watched.acked.append(ev.id)
            if not self.watched.drop_acks:
                await ack()

        return ev, watched_ack

    async def close(self) -> None:
        await self.inner.close()


async def test_memory_broker_takes_what_has_arrived_in_one_transaction(pgflow_dsn: str) -> None:
    n = 300
    memory = MemoryConnector([event(f"e{i}", f"acct-{i}", "paid") for i in range(n)], broker=True)
    calls: Counter[str] = Counter()
    async with build(pgflow_dsn, memory, trigger_fn(calls)) as wf:
        runner = wf.runners[0]

        async def done() -> bool:
            return memory.position("bb--feed-1-of-1") == n

        await wait_until(done, message=f"{n} events acked")
        assert runner.fallbacks == 0
    runs, transactions = await _runs(pgflow_dsn)
    assert runs == {f"e{i}": 1 for i in range(n)}
    assert calls == Counter({f"e{i}": 1 for i in range(n)})
    assert transactions <= 4, transactions  # batches of <= 100 (one per event before)


@pytest.fixture
async def stream() -> AsyncIterator[str]:
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex(("127.0.0.1", 6379)) != 0:
            pytest.skip("no Redis server on 127.0.0.1:6379")
    import redis.asyncio as aioredis

    name = f"pgflow-test-{uuid.uuid4().hex[:10]}"
    yield name
    client = aioredis.from_url(REDIS)
    await client.delete(name)
    await client.aclose()


async def _pending(stream: str, group: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS)
    try:
        info = await client.xpending(stream, group)
        return int(info["pending"])
    finally:
        await client.aclose()


async def test_redis_batches_and_acks_after_commit(pgflow_dsn: str, stream: str) -> None:
    from pgflow.connectors import redis as rc

    n = 200
    source = rc.Connector(REDIS, stream, block=timedelta(milliseconds=100), count=100)
    watched = Watched(source, pgflow_dsn)
    try:
        for i in range(n):
            await source.publish(event(f"e{i}", f"acct-{i}", "paid"))
        calls: Counter[str] = Counter()
        async with build(pgflow_dsn, watched, trigger_fn(calls)):

            async def done() -> bool:
                return len(watched.acked) == n

            await wait_until(done, timeout=30, message=f"{n} events acked")
        assert await _pending(stream, "bb--feed-1-of-1") == 0
    finally:
        await source.close()
    runs, transactions = await _runs(pgflow_dsn)
    assert runs == {f"e{i}": 1 for i in range(n)}
    assert calls == Counter({f"e{i}": 1 for i in range(n)})
    assert watched.acked == [f"e{i}" for i in range(n)]  # in order
    assert watched.uncommitted_acks == []
    assert transactions <= 10, transactions  # 200 before


async def test_a_failing_event_in_a_batch_never_reruns_the_others(pgflow_dsn: str) -> None:
    """e7 fails twice then succeeds, e15 is rejected, e20 always fails: each is retried
    or dead-lettered alone; every other function runs once; acks come in source order,
    each after its effect committed; per foreign id, handling stays in order."""
    n = 30
    memory = MemoryConnector(
        [event(f"e{i}", f"acct-{i % 3}", "paid", seq=str(i)) for i in range(n)], broker=True
    )
    watched = Watched(memory, pgflow_dsn)
    calls: Counter[str] = Counter()
    order: dict[str, list[int]] = defaultdict(list)
    position_while_e7_failed: list[int] = []

    async def fn(api: pgflow.API[dict[str, Any], S], ev: ConnectorEvent) -> None:
        calls[ev.id] += 1
        if ev.id == "e7" and calls[ev.id] <= 2:
            position_while_e7_failed.append(memory.position("bb--feed-1-of-1"))
            raise RuntimeError("flaky")
        if ev.id == "e15":
            raise Reject("bad amount")
        if ev.id == "e20":
            raise RuntimeError("always")
        # one run per event: foreign ids repeat, so each run gets its own foreign id
        await api.trigger(f"{ev.id}-run", {"id": ev.id}, run_id=pgflow.run_id_for("bb", ev.id))
        order[ev.foreign_id].append(int(ev.headers["seq"]))

    async with build(pgflow_dsn, watched, fn, max_retries=3) as wf:
        runner = wf.runners[0]

        async def done() -> bool:
            return memory.position("bb--feed-1-of-1") == n

        await wait_until(done, message="every event acked")
        assert runner.dead == 2
    expected = Counter({f"e{i}": 1 for i in range(n)})
    expected.update({"e7": 2, "e20": 2})  # e7: 3 attempts, e20: max_retries=3
    assert calls == expected
    assert position_while_e7_failed and max(position_while_e7_failed) <= 7  # not acked
    assert watched.acked == [f"e{i}" for i in range(n)]
    assert watched.uncommitted_acks == []
    runs, _ = await _runs(pgflow_dsn)
    assert runs == {f"e{i}": 1 for i in range(n) if i not in (15, 20)}
    assert await _dead_letters(pgflow_dsn) == {"e15": 1, "e20": 3}
    for fid, seqs in order.items():
        assert seqs == sorted(seqs), fid


async def test_redelivery_after_a_crash_between_commit_and_ack(pgflow_dsn: str) -> None:
    """A worker commits its batches but dies before any ack: the next consumer of that
    name gets every event again, and each still has exactly one run."""
    n = 120
    memory = MemoryConnector([event(f"e{i}", f"acct-{i}", "paid") for i in range(n)], broker=True)
    crashed = Watched(memory, pgflow_dsn, drop_acks=True)
    calls: Counter[str] = Counter()
    async with build(pgflow_dsn, crashed, trigger_fn(calls)):

        async def all_seen() -> bool:
            return len(crashed.acked) == n

        await wait_until(all_seen, message="the first worker committed everything")
    assert memory.position("bb--feed-1-of-1") == 0  # nothing acked
    memory.append(*(event(f"e{i}", f"acct-{i}", "paid") for i in range(n, n + 30)))
    async with build(pgflow_dsn, memory, trigger_fn(calls)):

        async def done() -> bool:
            return memory.position("bb--feed-1-of-1") == n + 30

        await wait_until(done, message="redelivered and new events acked")
    runs, _ = await _runs(pgflow_dsn)
    assert runs == {f"e{i}": 1 for i in range(n + 30)}
    assert await _dead_letters(pgflow_dsn) == {}


async def test_redis_redelivery_after_a_crash_claims_and_runs_once(
    pgflow_dsn: str, stream: str
) -> None:
    from pgflow.connectors import redis as rc

    n = 60
    claim = timedelta(milliseconds=300)
    source = rc.Connector(REDIS, stream, block=timedelta(milliseconds=100), claim_idle=claim)
    crashed = Watched(source, pgflow_dsn, drop_acks=True)
    calls: Counter[str] = Counter()
    try:
        for i in range(n):
            await source.publish(event(f"e{i}", f"acct-{i}", "paid"))
        async with build(pgflow_dsn, crashed, trigger_fn(calls)):

            async def all_seen() -> bool:
                return len(crashed.acked) == n

            await wait_until(all_seen, timeout=30, message="the first worker committed")
        assert await _pending(stream, "bb--feed-1-of-1") == n
        async with build(pgflow_dsn, source, trigger_fn(calls)):

            async def claimed() -> bool:
                return await _pending(stream, "bb--feed-1-of-1") == 0

            await wait_until(claimed, timeout=30, message="redelivered and acked")
    finally:
        await source.close()
    runs, _ = await _runs(pgflow_dsn)
    assert runs == {f"e{i}": 1 for i in range(n)}
    assert min(calls.values()) == 2  # every event really was delivered twice


class ListBroker:
    """A broker over a fixed list: an item that is an exception is raised by recv()."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.acks: list[str] = []

    async def make(self, consumer_name: str) -> Any:
        return _ListConsumer(self)


class _ListConsumer:
    def __init__(self, broker: ListBroker) -> None:
        self.broker = broker
        self.next = 0

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        if self.next >= len(self.broker.items):
            await asyncio.Event().wait()  # nothing more, ever
        item = self.broker.items[self.next]
        self.next += 1
        name = item.event_id if isinstance(item, MalformedEvent) else item.id

        async def ack() -> None:
            self.broker.acks.append(name)

        if isinstance(item, MalformedEvent):
            raise MalformedEvent(item.reason, event_id=item.event_id, payload=b"?", ack=ack)
        return item, ack

    async def close(self) -> None:
        return None


async def test_a_malformed_message_waits_for_the_batch_before_it(pgflow_dsn: str) -> None:
    """A recv() that raises while a batch is gathered ends the batch; the batch is acked
    first, then the malformed message is dead-lettered and acked, then the rest."""
    items: list[Any] = [event(f"e{i}", f"acct-{i}", "paid") for i in range(10)]
    items.insert(4, MalformedEvent("not json", event_id="m4"))
    broker = ListBroker(items)
    calls: Counter[str] = Counter()
    async with build(pgflow_dsn, broker, trigger_fn(calls)):

        async def done() -> bool:
            return len(broker.acks) == 11

        await wait_until(done, message="every message acked")
    assert broker.acks == ["e0", "e1", "e2", "e3", "m4", "e4", "e5", "e6", "e7", "e8", "e9"]
    assert await _dead_letters(pgflow_dsn) == {"m4": 1}
    runs, transactions = await _runs(pgflow_dsn)
    assert runs == {f"e{i}": 1 for i in range(10)}
    assert transactions == 2


def _up(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.asynccontextmanager
async def _nats_source() -> AsyncIterator[Any]:
    import nats

    from pgflow.connectors import nats as nc

    suffix = uuid.uuid4().hex[:10]
    stream = f"PGFLOWT_{suffix}"
    source = nc.Connector(
        "nats://127.0.0.1:4222",
        stream,
        [f"pgflowt{suffix}.>"],
        fetch_batch=100,
        fetch_timeout=timedelta(milliseconds=200),
    )
    try:
        yield source
    finally:
        await source.close()
        client = await nats.connect("nats://127.0.0.1:4222")
        with contextlib.suppress(Exception):
            await client.jetstream().delete_stream(stream)
        await client.close()


@contextlib.asynccontextmanager
async def _rabbitmq_source() -> AsyncIterator[Any]:
    import aio_pika

    from pgflow.connectors import rabbitmq

    suffix = uuid.uuid4().hex[:10]
    source = rabbitmq.Connector(
        "amqp://guest:guest@127.0.0.1:5672/",
        f"pgflow-test-{suffix}",
        queue_prefix=f"pgflow-test-{suffix}.",
        prefetch=100,
    )
    await source.declare("bb--feed-1-of-1")
    try:
        yield source
    finally:
        await source.close()
        connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
        channel = await connection.channel()
        await channel.queue_delete(source.queue_name("bb--feed-1-of-1"))
        await channel.exchange_delete(source.exchange)
        await connection.close()


@pytest.mark.parametrize(("broker", "port"), [("nats", 4222), ("rabbitmq", 5672)])
async def test_nats_and_rabbitmq_batch_too(pgflow_dsn: str, broker: str, port: int) -> None:
    if not _up(port):
        pytest.skip(f"no {broker} server on 127.0.0.1:{port}")
    n = 100
    sources = {"nats": _nats_source, "rabbitmq": _rabbitmq_source}
    async with sources[broker]() as source:
        for i in range(n):
            await source.publish(event(f"e{i}", f"acct-{i}", "paid"))
        watched = Watched(source, pgflow_dsn)
        calls: Counter[str] = Counter()
        async with build(pgflow_dsn, watched, trigger_fn(calls)):

            async def done() -> bool:
                return len(watched.acked) == n

            await wait_until(done, timeout=30, message=f"{n} events acked")
    runs, transactions = await _runs(pgflow_dsn)
    assert runs == {f"e{i}": 1 for i in range(n)}
    assert calls == Counter({f"e{i}": 1 for i in range(n)})
    assert watched.acked == [f"e{i}" for i in range(n)]
    assert watched.uncommitted_acks == []
    print(f"{broker}: {n} events in {transactions} transactions")
    assert transactions <= n // 4, transactions
