"""The conformance checks that drive a real workflow (see :mod:`pgflow.testing.connectors`).

Each builds a small workflow whose connector function triggers one run per event
(``run_id_for`` the event id, so a redelivery triggers nothing new) and watches the
connector's consumers through :class:`Watched`: every ack is recorded in order,
together with whether the event's effect — its run, or its dead letter — was already
committed when the ack came, seen from another connection.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from pgflow.connectors._base import Ack, ConnectorEvent, MalformedEvent, TransactionalConsumer
from pgflow.testing._source import (
    NotApplicable,
    Source,
    SourceFactory,
    check_probe,
    events,
    expect,
    new_tag,
    prepare,
)
from pgflow.workflow._connectors import consumer_name, dead_letter_consumer
from pgflow.workflow.api import API, run_id_for
from pgflow.workflow.builder import Builder
from pgflow.workflow.workflow import Workflow

__all__ = ["check_workflow_crash", "check_workflow_malformed", "check_workflow_once"]

CONNECTOR = "feed"


class S(enum.IntEnum):
    NEW = 1
    DONE = 2


async def _noop(run: Any, payload: Any) -> None:
    return None


def _consumer_name(workflow: str) -> str:
    return consumer_name(workflow, CONNECTOR, 0, 1)


def _build(
    dsn: str, name: str, connector: Any, calls: Counter[str], order: dict[str, list[str]]
) -> Workflow[dict[str, Any], S]:
    """A callback (not a step) waits on NEW, so no record is updated after the
    transaction that inserted it: the records' distinct ``xmin`` count transactions."""

    async def fn(api: API[dict[str, Any], S], ev: ConnectorEvent) -> None:
        calls[ev.id] += 1
        order[ev.foreign_id].append(ev.id)
        await api.trigger(ev.id, {"id": ev.id}, run_id=run_id_for(name, ev.id))

    b: Builder[dict[str, Any], S] = Builder(name, dict, S)
    b.add_callback(S.NEW, _noop, S.DONE)
    b.add_connector(CONNECTOR, connector, fn, batch_size=100, err_backoff=0.02)
    return b.build(dsn)


async def _query(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql, args)
        return list(await cur.fetchall())


async def _runs(dsn: str, workflow: str) -> tuple[dict[str, int], int]:
    """(runs per event id, distinct inserting transactions) of ``workflow``."""
    where = "FROM pgflow.records WHERE workflow = %s"
    rows = await _query(dsn, f"SELECT object->>'id', count(*) {where} GROUP BY 1", workflow)
    xacts = await _query(dsn, f"SELECT count(DISTINCT xmin::text) {where}", workflow)
    return {eid: int(n) for eid, n in rows}, int(xacts[0][0])


async def _wait_until(
    check: Callable[[], bool | Awaitable[bool]], timeout: float, message: str
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ok = check()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {message}")
        await asyncio.sleep(0.05)


class Watched:
    """Wraps the connector under test and records every ack (see the module doc).
    ``drop_acks``: acks are recorded but never reach the source (a crash between the
    commit and the ack)."""

    def __init__(self, inner: Any, dsn: str, workflow: str, *, drop_acks: bool = False) -> None:
        self.inner = inner
        self.dsn = dsn
        self.workflow = workflow
        self.drop_acks = drop_acks
        self.acked: list[str] = []
        self.uncommitted_acks: list[str] = []

    async def make(self, consumer_name: str) -> Any:
        consumer = await self.inner.make(consumer_name)
        if isinstance(consumer, TransactionalConsumer):
            return _WatchedTransactional(self, consumer)
        return _WatchedConsumer(self, consumer)

    def first_acks(self) -> list[str]:
        """Each acked id once, at its first ack (a redelivery may ack it again)."""
        return list(dict.fromkeys(self.acked))

    def wrap(self, event_id: str, ack: Ack, *, in_transaction: bool = False) -> Ack:
        async def watched_ack() -> None:
            if not in_transaction and not await self._committed(event_id):
                self.uncommitted_acks.append(event_id)
            self.acked.append(event_id)
            if not self.drop_acks:
                await ack()

        return watched_ack

    async def _committed(self, event_id: str) -> bool:
        rows = await _query(
            self.dsn,
            "SELECT EXISTS (SELECT FROM pgflow.records WHERE workflow = %s"
            "  AND object->>'id' = %s)"
            " OR EXISTS (SELECT FROM pgflow.dead_letters WHERE consumer = %s AND event_id = %s)",
            self.workflow,
            event_id,
            dead_letter_consumer(self.workflow, CONNECTOR),
            event_id,
        )
        return bool(rows[0][0])


class _WatchedConsumer:
    def __init__(self, watched: Watched, inner: Any) -> None:
        self.watched = watched
        self.inner = inner

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        try:
            ev, ack = await self.inner.recv()
        except MalformedEvent as bad:
            bad.ack = self.watched.wrap(bad.event_id, bad.ack)
            raise
        return ev, self.watched.wrap(ev.id, ack)

    async def close(self) -> None:
        await self.inner.close()


class _WatchedTransactional(_WatchedConsumer):
    """Acks in the batch's own transaction: effect and ack commit together."""

    async def recv_batch_in(self, conn: Any, limit: int) -> list[tuple[ConnectorEvent, Ack]]:
        batch = await self.inner.recv_batch_in(conn, limit)
        return [(ev, self.watched.wrap(ev.id, ack, in_transaction=True)) for ev, ack in batch]

    async def flush_in(self, conn: Any) -> None:
        flush = getattr(self.inner, "flush_in", None)
        if flush is not None:
            await flush(conn)


async def _publish(src: Source, sent: list[ConnectorEvent]) -> None:
    for e in sent:
        await src.publish(e)


async def check_workflow_once(make: SourceFactory, dsn: str) -> None:
    """Each event: one run, one call, acked after commit (see the connectors module)."""
    n, workflow = 100, f"conform_once_{new_tag()}"
    calls: Counter[str] = Counter()
    order: dict[str, list[str]] = defaultdict(list)
    async with make(False) as src:
        await prepare(src, _consumer_name(workflow))
        sent = events(new_tag(), n, 5)
        await _publish(src, sent)
        watched = Watched(src.connector, dsn, workflow)
        async with _build(dsn, workflow, watched, calls, order):
            await _wait_until(
                lambda: len(set(watched.acked)) >= n, src.timeout, f"{n} events acked"
            )
    runs, transactions = await _runs(dsn, workflow)
    expect(runs == {e.id: 1 for e in sent}, f"runs per event: {runs}")
    expect(calls == Counter({e.id: 1 for e in sent}), f"function calls per event: {calls}")
    expect(watched.uncommitted_acks == [], f"acked before commit: {watched.uncommitted_acks}")
    if src.ordered:
        acked = watched.first_acks()
        for fid in {e.foreign_id for e in sent}:
            want = [e.id for e in sent if e.foreign_id == fid]
            expect(order[fid] == want, f"{fid}: handled in order {order[fid]}, sent {want}")
            got = [i for i in acked if i in set(want)]
            expect(got == want, f"{fid}: acked in order {got}, sent {want}")
    if src.batches is not None:
        expect(
            transactions <= src.batches,
            f"{n} events took {transactions} transactions, not at most {src.batches}: does"
            " recv() return what the consumer already holds without waiting? (Source.batches)",
        )


async def check_workflow_crash(make: SourceFactory, dsn: str) -> None:
    """Committed, died before acking: redelivered, still one run each (module doc)."""
    n, workflow = 60, f"conform_crash_{new_tag()}"
    calls: Counter[str] = Counter()
    order: dict[str, list[str]] = defaultdict(list)
    tag = new_tag()
    async with make(True) as src:
        await prepare(src, _consumer_name(workflow))
        sent = events(tag, n, 7)
        await _publish(src, sent)
        crashed = Watched(src.connector, dsn, workflow, drop_acks=True)
        async with _build(dsn, workflow, crashed, calls, order):
            await _wait_until(
                lambda: len(set(crashed.acked)) >= n, src.timeout, "the first worker committed"
            )
        later = events(tag, 10, 7, start=n)
        await _publish(src, later)
        healthy = Watched(src.connector, dsn, workflow)
        async with _build(dsn, workflow, healthy, calls, order):
            await _wait_until(
                lambda: len(set(healthy.acked)) >= n + len(later),
                src.timeout * 2,
                "every event redelivered and acked",
            )
    runs, _ = await _runs(dsn, workflow)
    expect(runs == {e.id: 1 for e in sent + later}, f"runs per event: {runs}")
    redelivered = [e.id for e in sent if calls[e.id] < 2]
    expect(not redelivered, f"never delivered again after the crash: {redelivered}")
    dead = await _query(dsn, "SELECT event_id FROM pgflow.dead_letters")
    expect(dead == [], f"dead letters: {dead}")


async def check_workflow_malformed(make: SourceFactory, dsn: str) -> None:
    """An undecodable message is dead-lettered, acked after that, and the consumer
    keeps going (see the connectors module)."""
    workflow = f"conform_bad_{new_tag()}"
    calls: Counter[str] = Counter()
    order: dict[str, list[str]] = defaultdict(list)
    tag = new_tag()
    async with make(False) as src:
        if src.publish_malformed is None:
            raise NotApplicable("the source cannot carry undecodable messages")
        await prepare(src, _consumer_name(workflow))
        e0, e1, e2 = events(tag, 3, 3)
        await src.publish(e0)
        probe = await src.publish_malformed()
        await src.publish(e1)
        watched = Watched(src.connector, dsn, workflow)
        letters: list[tuple[Any, ...]] = []

        async def dead_lettered() -> bool:
            letters[:] = await _query(
                dsn,
                "SELECT event_id, reason, payload FROM pgflow.dead_letters WHERE consumer = %s",
                dead_letter_consumer(workflow, CONNECTOR),
            )
            return bool(letters)

        async with _build(dsn, workflow, watched, calls, order):
            await _wait_until(dead_lettered, src.timeout, "the malformed message dead-lettered")
            await src.publish(e2)  # after it: the consumer is still there
            await _wait_until(
                lambda: {e0.id, e1.id, e2.id} <= set(watched.acked), src.timeout, "events acked"
            )
    expect(len(letters) == 1, f"dead letters: {letters}")
    event_id, reason, payload = letters[0]
    check_probe(MalformedEvent(reason, event_id=event_id, payload=payload), probe)
    expect(event_id in watched.acked, f"the malformed message {event_id} was not acked")
    expect(watched.uncommitted_acks == [], f"acked before commit: {watched.uncommitted_acks}")
    runs, _ = await _runs(dsn, workflow)
    expect(runs == {e.id: 1 for e in (e0, e1, e2)}, f"runs per event: {runs}")
