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

from pgflow.errors import MalformedEvent, Reject

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


#: ``await ack()`` once the event's effects are committed; the source may then forget it.
Ack = Callable[[], Awaitable[None]]


@runtime_checkable
class ConnectorConsumer(Protocol):
    """One consumer's view of a source: the next event, and how to acknowledge it.

    An event not acknowledged (the process died, the function raised) comes again.
    """

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
    """A source of outside events: makes a consumer per consumer name (one per shard
    with ``parallel_count=N``), so each shard keeps its own position."""

    async def make(self, consumer_name: str) -> ConnectorConsumer: ...


#: A connector function: receives the workflow API (:class:`~pgflow.API`) and the event.
ConnectorFunc = Callable[[Any, ConnectorEvent], Awaitable[None]]
