"""Broker connectors batch: the events a broker consumer already holds go through one
transaction (the optimistic batch machinery), and are acked in order after its commit.

Transactions are counted by the ``xmin`` of the runs' records: a callback (not a step)
waits on NEW, so no record is updated after the transaction that inserted it.
The runner is driven here by the memory connector and a list; that every broker
connector batches, acks after commit and survives a crash between commit and ack is
checked by the conformance suite (tests/test_connector_conformance.py).
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter, defaultdict
from typing import Any

import psycopg

import pgflow
from pgflow.connectors import Ack, ConnectorEvent, MalformedEvent, Reject
from pgflow.connectors.memory import Connector as MemoryConnector
from pgflow.connectors.memory import event
from pgflow.testing._workflow_checks import Watched
from tests._util import wait_until


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


async def test_a_failing_event_in_a_batch_never_reruns_the_others(pgflow_dsn: str) -> None:
    """e7 fails twice then succeeds, e15 is rejected, e20 always fails: each is retried
    or dead-lettered alone; every other function runs once; acks come in source order,
    each after its effect committed; per foreign id, handling stays in order."""
    n = 30
    memory = MemoryConnector(
        [event(f"e{i}", f"acct-{i % 3}", "paid", seq=str(i)) for i in range(n)], broker=True
    )
    watched = Watched(memory, pgflow_dsn, "bb")
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
