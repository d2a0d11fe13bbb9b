"""The rows of ``pgflow.cursors``: the only SQL that writes a reader's stored position.

A cursor row holds one reader's :class:`~pgflow.log.snapshots.Position` (``snap``,
``upto``, ``after_id``, ``lo``, ``hi``), keyed by consumer name and shard. Every writer
of those rows goes through here — the event-log :class:`~pgflow.log.cursors.Consumer`,
the table connector's cursor store, webhook consumers — so the compare-and-set that
makes a batch apply once, and what a new row starts at, are written once.

Moves are compare-and-set (:func:`advance_cursor`, :func:`upsert_cursor`) in the
caller's transaction, so the position commits with the reader's effects; a move from a
position that is no longer stored changes nothing and returns False (the caller rolls
back). A missing row means the start of the log, or — for a new shard layout of a
consumer that already has one — where every shard of the old layout had read
(:func:`inherited_snapshot`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from pgflow.errors import LostCursor
from pgflow.log.snapshots import START_SNAPSHOT, Position, intersect_snapshots
from pgflow.log.streamer import Filter

__all__ = [
    "IDLE_ADVANCE_AFTER",
    "POSITION_COLUMNS",
    "CursorKey",
    "LostCursor",
    "advance_cursor",
    "ensure_cursor",
    "inherit_layout",
    "inherited_snapshot",
    "load_cursor",
    "position_from_row",
    "try_lock_shard",
    "upsert_cursor",
]


@dataclass(frozen=True, slots=True)
class CursorKey:
    """Identifies one cursor: a consumer name and its shard (``shard`` of ``shard_count``)."""

    consumer: str
    shard: int = 0
    shard_count: int = 1

    def __str__(self) -> str:
        if self.shard_count == 1:
            return self.consumer
        return f"{self.consumer}[{self.shard + 1}/{self.shard_count}]"


async def ensure_cursor(
    conn: AsyncConnection[Any], key: CursorKey, filter: Filter | None = None
) -> None:
    """Create the cursor row if it does not exist yet: at the start of the log, or —
    when the same consumer already has a complete layout of other shards (its
    ``parallel_count`` changed, or two deploys run two layouts) — where every shard of
    those layouts has read up to (:func:`inherited_snapshot`), so a new layout does not
    re-read the whole log. What is read twice near that point is harmless: steps apply
    once per (run, version)."""
    cur = await conn.execute(
        "SELECT shard_count, count(*), array_agg(snap::text) FROM pgflow.cursors"
        " WHERE consumer = %s AND shard_count <> %s GROUP BY shard_count",
        (key.consumer, key.shard_count),
    )
    layouts = [(int(n), int(have), list(snaps)) for n, have, snaps in await cur.fetchall()]
    await conn.execute(
        "INSERT INTO pgflow.cursors (consumer, shard, shard_count, stream, types, snap)"
        " VALUES (%s, %s, %s, %s, %s, %s::pg_snapshot) ON CONFLICT DO NOTHING",
        (
            key.consumer,
            key.shard,
            key.shard_count,
            filter.stream if filter else None,
            list(filter.types) if filter and filter.types else None,
            inherited_snapshot(layouts),
        ),
    )


def inherited_snapshot(layouts: Sequence[tuple[int, int, Sequence[str]]]) -> str:
    """Where a new layout of a consumer may start, given its other layouts as
    ``(shard_count, rows present, their snapshots)``: the intersection of the
    snapshots of every complete layout (an incomplete one says nothing: a missing shard
    is at the start). A shard's partial diff is ignored: read again, harmlessly."""
    return intersect_snapshots([s for n, have, group in layouts if have == n for s in group])


#: The stored position's columns, in :class:`Position`'s field order.
POSITION_COLUMNS = "snap::text, upto::text, after_id, lo, hi"


def position_from_row(row: Any) -> Position:
    """A :class:`Position` from the five :data:`POSITION_COLUMNS`."""
    return Position(str(row[0]), row[1], int(row[2]), row[3], row[4])


async def load_cursor(conn: AsyncConnection[Any], key: CursorKey) -> Position:
    """The stored position (the start of the log when the cursor does not exist)."""
    return await _load(conn, key) or Position.start()


async def _load(conn: AsyncConnection[Any], key: CursorKey) -> Position | None:
    cur = await conn.execute(
        f"SELECT {POSITION_COLUMNS} FROM pgflow.cursors"
        " WHERE consumer = %s AND shard = %s AND shard_count = %s",
        (key.consumer, key.shard, key.shard_count),
    )
    row = await cur.fetchone()
    return position_from_row(row) if row else None


#: An idle consumer moves its snapshot to the present at most this often (seconds):
#: often enough that prune and ``pgflow.consumer_lag`` see it caught up, rarely enough
#: that waiting costs no writes worth counting.
IDLE_ADVANCE_AFTER = 10.0

#: ``SET`` list and compare-and-set test for a position (named parameters).
_SET_POSITION = (
    "snap = %(snap)s::pg_snapshot, upto = %(upto)s::pg_snapshot, after_id = %(after)s,"
    " lo = %(lo)s, hi = %(hi)s, updated_at = now()"
)
_AT_POSITION = (
    "{c}snap::text = %(old_snap)s AND {c}upto::text IS NOT DISTINCT FROM %(old_upto)s"
    " AND {c}after_id = %(old_after)s"
)


def _move_params(key: CursorKey, old: Position, new: Position) -> dict[str, Any]:
    """Parameters for :data:`_SET_POSITION` (``new``), :data:`_AT_POSITION` (``old``)
    and the key's columns."""
    return {
        "consumer": key.consumer,
        "shard": key.shard,
        "shard_count": key.shard_count,
        "snap": new.snapshot,
        "upto": new.upto,
        "after": new.after_id,
        "lo": new.lo,
        "hi": new.hi,
        "old_snap": old.snapshot,
        "old_upto": old.upto,
        "old_after": old.after_id,
    }


async def advance_cursor(
    conn: AsyncConnection[Any], key: CursorKey, old: Position, new: Position
) -> bool:
    """Compare-and-set the cursor from ``old`` to ``new`` in the caller's transaction.

    Returns False (and changes nothing) when the stored cursor is no longer ``old``:
    someone else applied these events; the caller must roll back.
    """
    if not new.could_follow(old):
        raise ValueError(f"cursor must move forwards: {old} -> {new}")
    cur = await conn.execute(
        f"UPDATE pgflow.cursors SET {_SET_POSITION}"
        " WHERE consumer = %(consumer)s AND shard = %(shard)s AND shard_count = %(shard_count)s"
        " AND " + _AT_POSITION.format(c=""),
        _move_params(key, old, new),
    )
    return cur.rowcount == 1


async def upsert_cursor(
    conn: AsyncConnection[Any],
    key: CursorKey,
    old: Position,
    new: Position,
    stream: str | None = None,
    source: str | None = None,
) -> bool:
    """:func:`advance_cursor` that also creates a missing row (a missing row means the
    start of the log, :func:`load_cursor`'s answer). False when not at ``old``.
    ``stream``/``source`` are recorded on a new row (what it reads, for lag and prune)."""
    if old != Position.start():
        return await advance_cursor(conn, key, old, new)
    cur = await conn.execute(
        "INSERT INTO pgflow.cursors AS c"
        " (consumer, shard, shard_count, stream, source, snap, upto, after_id, lo, hi)"
        " VALUES (%(consumer)s, %(shard)s, %(shard_count)s, %(stream)s, %(source)s,"
        " %(snap)s::pg_snapshot, %(upto)s::pg_snapshot, %(after)s, %(lo)s, %(hi)s)"
        f" ON CONFLICT (consumer, shard, shard_count) DO UPDATE SET {_SET_POSITION}"
        " WHERE " + _AT_POSITION.format(c="c."),
        {**_move_params(key, old, new), "stream": stream, "source": source},
    )
    return cur.rowcount == 1


async def inherit_layout(
    conn: AsyncConnection[Any],
    key: CursorKey,
    family: str,
    shard_count: int,
    stream: str | None = None,
    source: str | None = None,
) -> Position:
    """Where the cursor ``key`` starts when it has no row: ``key`` is one shard of
    ``shard_count`` of a connector whose shards' cursors are named
    ``<family>-<i>-of-<n>`` (one row each, ``shard_count`` 1: the layout is in the
    name). When every shard of a complete other layout of ``family`` has a row (the
    connector's ``parallel_count`` changed), the row is created where all of them had
    read, in ``conn``'s transaction, recording ``stream`` and ``source`` like
    :func:`upsert_cursor`; else, or when a row exists already, nothing is written and
    the answer is the start of the log."""
    cur = await conn.execute(
        "SELECT count(*) FROM pgflow.cursors WHERE consumer = %s", (key.consumer,)
    )
    if (await cur.fetchone() or [0])[0]:
        return Position.start()  # a row at the start: nothing to inherit
    cur = await conn.execute(
        "SELECT substring(consumer from '-of-([0-9]+)$')::int, count(*),"
        " array_agg(snap::text) FROM pgflow.cursors"
        " WHERE consumer LIKE %s AND consumer ~ %s"
        " AND substring(consumer from '-of-([0-9]+)$')::int <> %s GROUP BY 1",
        (_like_prefix(family) + "-%", r"-[0-9]+-of-[0-9]+$", shard_count),
    )
    snapshot = inherited_snapshot(
        [(int(n), int(have), list(s)) for n, have, s in await cur.fetchall()]
    )
    if snapshot == START_SNAPSHOT:
        return Position.start()
    inherited = Position(snapshot)
    await upsert_cursor(conn, key, Position.start(), inherited, stream, source)
    return inherited


def _like_prefix(text: str) -> str:
    """``text`` with LIKE's wildcards (and its escape character) escaped."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def try_lock_shard(conn: AsyncConnection[Any], key: CursorKey) -> bool:
    """Take the (consumer, shard) advisory lock for this transaction, without waiting.

    ``pg_try_advisory_xact_lock`` assigns no transaction id, so a consumer polling for
    work holds none open (an open xid holds back VACUUM for the whole cluster).
    """
    cur = await conn.execute(
        "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))",
        (f"pgflow-cursor:{key.consumer}:{key.shard}:{key.shard_count}",),
    )
    row = await cur.fetchone()
    return bool(row and row[0])
