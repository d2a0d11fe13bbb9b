"""The event log: what an event is, where a reader stands, and appending events.

``pgflow.events`` is append-only. Appending happens inside the caller's transaction
(the events table is the outbox and the stream at once); nothing here NOTIFYs, because
NOTIFY inside a write transaction serialises every committer on a cluster-wide lock.
Wake-ups are sent after commit by :class:`pgflow.log.listener.Notifier`.

``tx`` is stamped by the database (a BEFORE INSERT trigger sets it to the writer's
transaction id whatever the INSERT says): a forged ``tx`` would put an event into a
snapshot diff that was already read, and it would never be delivered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from psycopg import AsyncConnection

from pgflow.log.snapshots import Position

__all__ = ["Event", "NewEvent", "Position", "append", "shard_hash"]


class Event(NamedTuple):
    """One row of the event log, as a reader receives it.

    A named tuple, not a dataclass: readers build hundreds of thousands per second,
    and a tuple is made four times faster than a frozen dataclass (0.27 vs 1.2 µs per
    event, measured; a quarter of the gap between a consumer and a hand-written loop).
    """

    id: int
    tx: int
    stream: str
    type: str
    foreign_id: str
    run_id: UUID | None
    version: int
    shard_hash: int
    headers: Mapping[str, str]
    traceparent: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append; ``id``, ``tx`` and ``shard_hash`` are set by the database."""

    stream: str
    type: str
    foreign_id: str
    run_id: UUID | None = None
    version: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    traceparent: str | None = None


#: ``pgflow.events`` columns as aliased ``e``, in :class:`Event`'s field order (the
#: fields are named after the columns).
EVENT_COLUMNS = ", ".join(f"e.{name}" for name in Event._fields)


_new_event = tuple.__new__


def event_from_row(row: Sequence[Any], start: int = 0) -> Event:
    """Build an :class:`Event` from a row selected with :data:`EVENT_COLUMNS` (from
    column ``start`` on)."""
    return _new_event(Event, (row[start], int(row[start + 1]), *row[start + 2 : start + 11]))


def shard_hash(foreign_id: str) -> int:
    """The shard hash the database stores for ``foreign_id`` (md5 prefix, 28 bits).

    Stable across processes, machines and languages, so one entity's events always
    land on the same shard: shard ``i`` of ``n`` reads ``shard_hash % n == i``.
    """
    return int(hashlib.md5(foreign_id.encode()).hexdigest()[:7], 16)


_INSERT = (
    "INSERT INTO pgflow.events"
    " (stream, type, foreign_id, run_id, version, headers, traceparent)"
    " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s) RETURNING id"
)


async def append(conn: AsyncConnection[Any], events: Sequence[NewEvent]) -> list[int]:
    """Insert ``events`` in the caller's transaction and return their ids, in order."""
    params = [
        (
            e.stream,
            e.type,
            e.foreign_id,
            e.run_id,
            e.version,
            json.dumps(dict(e.headers)),
            e.traceparent,
        )
        for e in events
    ]
    if len(params) == 1:
        cur = await conn.execute(_INSERT, params[0])
        row = await cur.fetchone()
        assert row is not None
        return [int(row[0])]
    ids: list[int] = []
    async with conn.cursor() as cur:
        await cur.executemany(_INSERT, params, returning=True)
        while True:
            row = await cur.fetchone()
            if row is not None:
                ids.append(int(row[0]))
            if not cur.nextset():
                break
    return ids
