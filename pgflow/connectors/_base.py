"""The connector contract: how outside events enter pgflow.

A :class:`Connector` makes one :class:`ConnectorConsumer` per consumer name (with
``parallel_count=N`` there are N of them, one per shard). ``recv()`` returns the next
event and an ``ack``; the runner calls the connector function and acks only after the
function's effects committed (at-least-once for brokers; ``trigger`` is idempotent on
the event id). Sources that live in the workflow's own database implement
:class:`TransactionalConsumer` as well: their ack then commits in the same transaction
as the function's effects, which makes triggering exactly-once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from psycopg import AsyncConnection

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = [
    "Ack",
    "Connector",
    "ConnectorConsumer",
    "ConnectorEvent",
    "ConnectorFunc",
    "FlushesAcks",
    "MalformedEvent",
    "Reject",
    "TransactionalConsumer",
]


@dataclass(frozen=True, slots=True)
class ConnectorEvent:
    """One event from an outside source, as a connector function sees it."""

    id: str
    foreign_id: str
    type: str
    headers: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


Ack = Callable[[], Awaitable[None]]


class Reject(Exception):
    """Raised by a connector function: this event can never succeed (invalid data).

    The runner dead-letters it at once in ``pgflow.dead_letters`` with ``reason``,
    without the retries an ordinary exception gets, and moves on. For transient
    failures (a network error, a lock timeout) raise anything else: those are retried.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedEvent(Exception):
    """A source message that cannot become a :class:`ConnectorEvent` (bad input).

    Raised by ``recv()`` / ``recv_batch_in()`` instead of returning an event. Nothing is
    lost: the message stays unacknowledged until the runner records it (e.g. in
    ``pgflow.dead_letters`` with ``reason`` and ``payload``) and calls ``ack()`` — for a
    transactional consumer inside the same transaction — which moves the consumer past
    it. A runner that ignores this error sees the same message again on the next call.
    """

    def __init__(
        self,
        reason: str,
        *,
        event_id: str,
        payload: Any = None,
        ack: Ack | None = None,
        foreign_id: str | None = None,
    ) -> None:
        super().__init__(f"malformed event {event_id}: {reason}")
        self.reason = reason
        self.event_id = event_id
        self.payload = payload  #: the raw message, JSON-serialisable where possible
        self.foreign_id = foreign_id

        async def _noop() -> None:
            return None

        self.ack: Ack = ack if ack is not None else _noop


@runtime_checkable
class ConnectorConsumer(Protocol):
    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        """Wait for and return the next event with its acknowledgement."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class TransactionalConsumer(Protocol):
    """A consumer whose position lives in the workflow's database.

    ``recv_batch_in(conn, limit)`` reads up to ``limit`` next events inside the
    caller's open transaction (taking whatever shard lock it needs) and returns them
    with acks that advance its cursor *in that same transaction*. It returns ``[]``
    when nothing is ready or another process owns the shard right now.

    Optional: ``async def flush_in(self, conn) -> None`` (see :class:`FlushesAcks`).
    A consumer that has it may keep acks in memory and write its position only when
    ``flush_in(conn)`` is called (or on its own, e.g. at the batch's last ack); the
    runner calls it once per batch, after the last ack and before committing. It is
    not a member of this protocol so that ``isinstance`` checks keep accepting
    consumers without it; callers look it up with ``getattr``.
    """

    async def recv_batch_in(
        self, conn: AsyncConnection[Any], limit: int
    ) -> list[tuple[ConnectorEvent, Ack]]: ...

    async def close(self) -> None: ...


class FlushesAcks(Protocol):
    """The optional half of :class:`TransactionalConsumer`: deferred acks.

    ``flush_in(conn)`` writes, in ``conn``'s open transaction, the position reached by
    the acks given so far (one write per batch instead of one per ack). It raises when
    the write cannot be made (e.g. :class:`~pgflow.log.cursors.LostCursor`: someone else
    moved the position), and the caller must then roll the transaction back.
    """

    async def flush_in(self, conn: AsyncConnection[Any]) -> None: ...


@runtime_checkable
class Connector(Protocol):
    async def make(self, consumer_name: str) -> ConnectorConsumer: ...


# The function receives the workflow API (pgflow.workflow.API) and the event.
ConnectorFunc = Callable[[Any, ConnectorEvent], Awaitable[None]]
