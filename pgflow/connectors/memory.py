"""An in-memory connector for tests and development (luno's memstreamer).

The connector holds one list of events. Every consumer name has its own position in
it, kept by the connector, so a consumer that is closed and made again under the same
name resumes after the last *acknowledged* event: whatever it received but did not
ack is delivered again, exactly like a broker redelivers unacked messages. Acks may
arrive out of order; the position only moves over a contiguous acknowledged prefix.

``recv()`` waits when the list is exhausted; :meth:`Connector.append` (sync, so tests
and plain code can call it) adds events and wakes the waiting consumers.

Under a workflow the consumer is also a
:class:`~pgflow.connectors.TransactionalConsumer`, so the runner hands it batches in
one transaction instead of one transaction per event: ``recv_batch_in(conn, limit)``
returns the next events, and their acks take effect only if that transaction
*commits*. The list lives in memory, not in the database, so the consumer learns the
outcome the database way: the first ack of a batch notes the transaction id
(``pg_current_xact_id()``), and the next ``recv_batch_in`` asks
``pg_xact_status(xid)`` — committed: the position moves past the acked events;
rolled back: they are delivered again. Exactly-once into the workflow's database while
the process lives (the position itself is not durable: this is a test/dev source).
Acks of the last batch before ``close()`` are not applied (their events are
redelivered to the next consumer of that name; ``trigger`` is idempotent).

``Connector(events, broker=True)`` makes consumers that offer only ``recv()`` and
``close()``, so the runner treats them as a broker (commit, then ack): tests and
benchmarks of that path without a broker server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection

from pgflow.connectors._base import Ack, ConnectorEvent

__all__ = ["Connector", "event"]


def event(id: str, foreign_id: str, type: str, **headers: str) -> ConnectorEvent:
    """Shorthand: ``event("e1", "order-1", "payment.completed", amount="10")``."""
    return ConnectorEvent(id, foreign_id, type, headers, datetime.now(UTC))


class _Position:
    """Where one consumer name stands: the first unacknowledged index, plus the
    acknowledged indexes beyond it (out-of-order acks)."""

    def __init__(self) -> None:
        self.next_unacked = 0
        self.acked_ahead: set[int] = set()

    def ack(self, index: int) -> None:
        if index < self.next_unacked:
            return
        self.acked_ahead.add(index)
        while self.next_unacked in self.acked_ahead:
            self.acked_ahead.discard(self.next_unacked)
            self.next_unacked += 1


class Connector:
    """In-memory events, one independent position per consumer name."""

    def __init__(self, events: Iterable[ConnectorEvent] = (), *, broker: bool = False) -> None:
        self._events: list[ConnectorEvent] = list(events)
        self.broker = broker  #: consumers look like a broker's (recv only), see module doc
        self._positions: dict[str, _Position] = {}
        self._waiters: set[asyncio.Event] = set()

    @property
    def events(self) -> list[ConnectorEvent]:
        """A copy of every event appended so far."""
        return list(self._events)

    def append(self, *events: ConnectorEvent) -> None:
        """Add events at the end and wake consumers waiting for more."""
        self._events.extend(events)
        for waiter in self._waiters:
            waiter.set()

    def position(self, consumer_name: str) -> int:
        """How many events ``consumer_name`` has acknowledged as a contiguous prefix."""
        pos = self._positions.get(consumer_name)
        return pos.next_unacked if pos else 0

    async def make(self, consumer_name: str) -> Consumer | BrokerConsumer:
        pos = self._positions.setdefault(consumer_name, _Position())
        consumer = Consumer(self, consumer_name, pos)
        return BrokerConsumer(consumer) if self.broker else consumer


class Consumer:
    """Delivers the events after its name's acknowledged position, in order."""

    def __init__(self, connector: Connector, name: str, position: _Position) -> None:
        self.connector = connector
        self.name = name
        self._position = position
        self._next = position.next_unacked  # next index to hand out
        self._wake = asyncio.Event()
        self._closed = False
        self._pending_acks: list[int] = []  # acked in a transaction not yet settled
        self._pending_xid: str | None = None
        connector._waiters.add(self._wake)

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        while True:
            if self._closed:
                raise RuntimeError(f"memory consumer {self.name!r} is closed")
            # Skip anything another consumer of the same name acked meanwhile.
            self._next = max(self._next, self._position.next_unacked)
            while self._next in self._position.acked_ahead:
                self._next += 1
            if self._next < len(self.connector._events):
                index = self._next
                self._next += 1
                return self.connector._events[index], self._ack_for(index)
            self._wake.clear()
            await self._wake.wait()

    async def recv_batch_in(
        self, conn: AsyncConnection[Any], limit: int
    ) -> list[tuple[ConnectorEvent, Ack]]:
        """Up to ``limit`` next events; acks count once ``conn``'s transaction commits."""
        if self._closed:
            raise RuntimeError(f"memory consumer {self.name!r} is closed")
        if self._pending_acks:
            if self._pending_xid is None:  # pragma: no cover - set by the first ack
                self._pending_acks.clear()
            else:
                cur = await conn.execute("SELECT pg_xact_status(%s::xid8)", (self._pending_xid,))
                row = await cur.fetchone()
                status = row[0] if row else None
                if status == "in progress":
                    return []  # the batch's transaction has not finished yet
                if status == "committed":
                    for index in self._pending_acks:
                        self._position.ack(index)
                self._pending_acks.clear()
                self._pending_xid = None
        out: list[tuple[ConnectorEvent, Ack]] = []
        index = self._position.next_unacked
        events = self.connector._events
        while len(out) < limit and index < len(events):
            if index not in self._position.acked_ahead:
                out.append((events[index], self._tx_ack_for(conn, index)))
            index += 1
        return out

    def _tx_ack_for(self, conn: AsyncConnection[Any], index: int) -> Ack:
        async def ack() -> None:
            if self._pending_xid is None:
                cur = await conn.execute("SELECT pg_current_xact_id()::text")
                row = await cur.fetchone()
                assert row is not None
                self._pending_xid = str(row[0])
            self._pending_acks.append(index)

        return ack

    def _ack_for(self, index: int) -> Ack:
        async def ack() -> None:
            self._position.ack(index)

        return ack

    async def close(self) -> None:
        self._closed = True
        self.connector._waiters.discard(self._wake)
        self._wake.set()


class BrokerConsumer:
    """A :class:`Consumer` seen as a broker's: ``recv()`` and ``close()`` only."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self.name = consumer.name

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        return await self._consumer.recv()

    async def close(self) -> None:
        await self._consumer.close()
