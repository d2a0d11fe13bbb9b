"""Tail a PostgreSQL table (or query) by cursor: luno's reflexstreamer, gap-free.

Usage::

    from pgflow.connectors import table
    payments = table.Connector(
        table.TableStream("app.payments"),          # id, tx, foreign_id, type, ...
        table.CursorStore(dsn),                      # the workflow's database
    )
    builder.add_connector("payments", payments, handle_payment)

How rows are read
-----------------
Like the core event log, a source is read in snapshot batches (see
:mod:`pgflow.log.snapshots`): each batch is the rows whose transaction committed since the
consumer's last snapshot, in id order, so a row whose transaction commits late is never
skipped, no "gap settle" timeout is needed, and a transaction left open elsewhere only
delays its own rows. This needs two columns on the source:

* ``id``: an integer, unique, increasing key (``bigint GENERATED ALWAYS AS IDENTITY``);
* ``tx``: ``xid8 NOT NULL DEFAULT pg_current_xact_id()``, the inserting transaction.
  :func:`add_tx_column` adds it (plus the ``(tx, id)`` and ``(id)`` indexes the read
  needs, and a trigger that stamps it so an INSERT cannot forge it) to an existing
  table. Adding a column with a volatile default rewrites the table under an
  ACCESS EXCLUSIVE lock; for a big, busy table add it nullable, backfill in batches,
  then set the default and ``NOT NULL``.

``tx`` is set on INSERT only, so this tails *new rows*. To see updates and deletes too,
install change capture (:func:`pgflow.connectors.capture`) and tail its change log with
:func:`pgflow.connectors.capture.changes_stream`.

An id-only source (``tx_column=None``) is read with ``id > cursor`` and is **not**
gap-free: with concurrent writers a smaller id can commit after a larger one was read,
and that row is skipped for good. Use it only when a single writer inserts rows in
commit order (e.g. a serial batch import), or for sources that are frozen while read.

Where the cursor lives, and exactly-once
-----------------------------------------
The cursor is a row of ``pgflow.cursors`` named ``connector:<source label>:<consumer
name>`` (e.g. ``connector:app.payments:orders--payments-1-of-1``) in the
:class:`CursorStore`'s database, which is also where the source is read. The
consumer implements :class:`~pgflow.connectors.TransactionalConsumer`: the workflow
runner calls ``recv_batch_in(conn, limit)`` inside its transaction and the acks
advance the cursor in that same transaction (compare-and-set, under a per-consumer
advisory lock that assigns no xid), so triggering the workflow and moving past the row
commit together: exactly-once, across crashes. Plain ``recv()`` (for other uses) acks
in a transaction of its own after the caller's effects: at-least-once.

One cursor write per batch: a transactional ``ack`` only records, in memory, that the
consumer may move past its row (acks go in order, each one event further; acking twice
is harmless, skipping one raises). The cursor row is written once, by a single
compare-and-set to the last acked row, when the batch's last event is acked or when
the caller calls :meth:`TableConsumer.flush_in` (the runner does, before it commits a
batch it stopped early). A failed compare-and-set raises
:class:`~pgflow.log.cursors.LostCursor` inside the transaction, which must roll back. A
caller that stops acking part-way must call ``flush_in`` before committing, or the
acked rows are delivered again. Each batch starts from the stored cursor, so a
rolled-back batch leaves nothing advanced in memory; read one batch per transaction.

Rows become events through a translator (:data:`RowTranslator`); a translator raises
``ValueError`` for a row it cannot use, which surfaces as
:class:`~pgflow.connectors.MalformedEvent` so the runner dead-letters it and moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import time as _time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from pgflow import _db
from pgflow.connectors._base import Ack, ConnectorEvent, MalformedEvent
from pgflow.errors import ConfigError
from pgflow.log.cursors import (
    IDLE_ADVANCE_AFTER,
    CursorKey,
    LostCursor,
    inherited_snapshot,
    load_cursor,
    try_lock_shard,
    upsert_cursor,
)
from pgflow.log.names import split_shard
from pgflow.log.snapshots import START_SNAPSHOT, DiffRead, Position, diff_read_sql

__all__ = [
    "Connector",
    "CursorStore",
    "Row",
    "RowTranslator",
    "Source",
    "TableConsumer",
    "TableStream",
    "add_tx_column",
    "default_translator",
    "header_value",
    "make_translator",
]

Row = Mapping[str, Any]
RowTranslator = Callable[[Row], ConnectorEvent]


def _like_prefix(text: str) -> str:
    """``text`` with LIKE's wildcards (and its escape character) escaped."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# --------------------------------------------------------------------------- sources


class Source(Protocol):
    """Something that can be read in cursor order: a table, a query, the event log."""

    @property
    def label(self) -> str:
        """A short name for logs and ``pgflow.cursors.stream``."""
        ...

    async def read(
        self, conn: AsyncConnection[Any], after: Position, limit: int
    ) -> list[tuple[Position, Row]]:
        """Up to ``limit`` rows after ``after``, in order, each with its position."""
        ...


def _qualified(name: str) -> sql.Composable:
    parts = [p.strip().strip('"') for p in name.split(".")]
    if not all(parts) or len(parts) > 2:
        raise ConfigError(f"bad table name {name!r}: use 'table' or 'schema.table'")
    return sql.SQL(".").join(sql.Identifier(p) for p in parts)


@dataclass(frozen=True, slots=True)
class TableStream:
    """Describes a source table or query and how to read it in order.

    Give ``table`` (``"schema.table"``) or ``query`` (any ``SELECT`` exposing the id and
    tx columns; it becomes a subquery aliased ``s``). ``columns`` limits what is
    selected (default: all); ``where`` is an extra, trusted SQL predicate over ``s``
    (e.g. ``"s.kind = %(kind)s"``) with ``params`` as its named parameters.
    """

    table: str | None = None
    query: str | None = None
    id_column: str = "id"
    tx_column: str | None = "tx"
    columns: Sequence[str] | None = None
    where: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    #: the translator a Connector uses for this source when given none
    translator: RowTranslator | None = None

    def __post_init__(self) -> None:
        if (self.table is None) == (self.query is None):
            raise ConfigError("TableStream needs exactly one of table= or query=")
        if self.table is not None:
            _qualified(self.table)
        if self.columns is not None and not self.columns:
            raise ConfigError("columns must be None (all) or non-empty")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.table:
            return self.table
        assert self.query is not None
        return "query:" + hashlib.sha1(self.query.encode()).hexdigest()[:10]

    def read_sql(self) -> sql.Composed:
        """The next chunk after a position (``__``-prefixed parameters, see
        :func:`pgflow.log.snapshots.diff_read_sql`); id order."""
        source: sql.Composable
        if self.table is not None:
            source = sql.SQL("SELECT * FROM {}").format(_qualified(self.table))
        else:
            assert self.query is not None
            source = sql.SQL(self.query)  # trusted SQL, from code
        relation = sql.SQL("(SELECT * FROM ({source}) s WHERE {where})").format(
            source=source, where=sql.SQL(self.where or "true")
        )
        cols: sql.Composable = (
            sql.SQL("e.*")
            if self.columns is None
            else sql.SQL(", ").join(sql.SQL("e.{}").format(sql.Identifier(c)) for c in self.columns)
        )
        id_col = sql.Identifier(self.id_column)
        if self.tx_column is None:
            return sql.SQL(
                "SELECT NULL, NULL, NULL, e.{id} AS __id, {cols} FROM {relation} e"
                " WHERE e.{id} > %(__after)s::bigint ORDER BY e.{id} LIMIT %(__limit)s"
            ).format(id=id_col, cols=cols, relation=relation)
        # diff_read_sql composes plain SQL text; the identifiers are quoted here first.
        return sql.SQL(
            diff_read_sql(
                relation="{relation}",
                columns="{cols}",
                tx="{tx}",
                id="{id}",
                keep_empty=True,
            )
        ).format(relation=relation, cols=cols, tx=sql.Identifier(self.tx_column), id=id_col)

    async def erase_for(
        self, conn: AsyncConnection[Any], translator: RowTranslator, foreign_id: str
    ) -> int:
        """Erase (NULL the row images of) the rows of the change log this stream
        delivers whose event would name ``foreign_id``. Only for ``pgflow.changes``: a
        user's table is theirs. A translator that declares its foreign id column
        (``translator.foreign_id_column``, the default change translator's ``pk``) is
        matched in SQL; any other is applied to every row of the stream (erasure is
        rare; correctness over speed)."""
        if self.table != "pgflow.changes":
            return 0
        relation = sql.SQL("(SELECT * FROM pgflow.changes s WHERE {where})").format(
            where=sql.SQL(self.where or "true")
        )
        column = getattr(translator, "foreign_id_column", None)
        if column is not None:
            cur = await conn.execute(
                sql.SQL(
                    "UPDATE pgflow.changes c SET old = NULL, new = NULL FROM {relation} e"
                    " WHERE c.id = e.id AND e.{col} = %(__fid)s"
                    " AND (c.old IS NOT NULL OR c.new IS NOT NULL)"
                ).format(relation=relation, col=sql.Identifier(column)),
                {**self.params, "__fid": foreign_id},
            )
            return max(cur.rowcount, 0)
        ids: list[int] = []
        cur = await conn.execute(
            sql.SQL(
                "SELECT e.* FROM {relation} e WHERE e.old IS NOT NULL OR e.new IS NOT NULL"
            ).format(relation=relation),
            dict(self.params),
        )
        names = [d.name for d in (cur.description or [])]
        for raw in await cur.fetchall():
            row = dict(zip(names, raw, strict=True))
            try:
                if translator(row).foreign_id == foreign_id:
                    ids.append(int(row["id"]))
            except (ValueError, KeyError, TypeError):
                continue  # a row it cannot translate was never delivered as an event
        if ids:
            await conn.execute(
                "UPDATE pgflow.changes SET old = NULL, new = NULL WHERE id = ANY(%s)", (ids,)
            )
        return len(ids)

    async def read(
        self, conn: AsyncConnection[Any], after: Position, limit: int
    ) -> list[tuple[Position, Row]]:
        return (await self.read_or_idle(conn, after, limit))[0]

    async def read_or_idle(
        self, conn: AsyncConnection[Any], after: Position, limit: int
    ) -> tuple[list[tuple[Position, Row]], Position | None]:
        """:meth:`read`, and when nothing is new, the position an idle reader may move
        to (the read's own snapshot: nothing of this source committed before it)."""
        params = {**self.params, **after.params(), "__limit": limit + 1}
        cur = await conn.execute(self.read_sql(), params)
        names = [d.name for d in (cur.description or [])][4:]
        raw = await cur.fetchall()
        if self.tx_column is None:
            return [
                (Position(after.snapshot, None, int(r[3])), dict(zip(names, r[4:], strict=True)))
                for r in raw[:limit]
            ], None
        if len(raw) == 1 and raw[0][3] is None:  # nothing new (keep_empty's marker row)
            if after.upto is not None:  # the diff is exhausted: go on from its end
                return await self.read_or_idle(conn, Position(after.upto), limit)
            idle = Position(str(raw[0][0]))
            return [], (idle if idle != after else None)
        read = DiffRead.from_rows(after, raw, limit)
        return [
            (p, dict(zip(names, r, strict=True)))
            for p, r in zip(read.positions, read.rows, strict=True)
        ], None


# ----------------------------------------------------------------------- translation


def header_value(value: Any) -> str:
    """A column value as a header string (ISO timestamps, JSON for json/arrays)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal | UUID):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return json.dumps(value, default=str, separators=(",", ":"))


def make_translator(
    *,
    id: str = "id",
    foreign_id: str = "foreign_id",
    type: str = "type",
    created_at: str = "created_at",
    exclude: Sequence[str] = ("tx",),
    id_prefix: str = "",
) -> RowTranslator:
    """A row translator reading the event fields from the named columns.

    Every other non-NULL column (except ``exclude``) becomes a header, as a string.
    ``foreign_id`` and ``type`` must be present and non-empty, else ``ValueError``.
    """
    used = {id, foreign_id, type, created_at, *exclude}

    def translate(row: Row) -> ConnectorEvent:
        for col in (id, foreign_id, type):
            if col not in row:
                raise ValueError(f"row has no {col!r} column")
            if row[col] is None or row[col] == "":
                raise ValueError(f"column {col!r} is empty")
        stamp = row.get(created_at)
        headers = {
            str(k): header_value(v) for k, v in row.items() if k not in used and v is not None
        }
        return ConnectorEvent(
            id=id_prefix + str(row[id]),
            foreign_id=header_value(row[foreign_id]),
            type=header_value(row[type]),
            headers=headers,
            created_at=stamp if isinstance(stamp, datetime) else datetime.now(UTC),
        )

    return translate


#: id, foreign_id and type columns; every other column (but ``tx``) as a header.
default_translator: RowTranslator = make_translator()


def _jsonable(row: Row) -> dict[str, Any]:
    return {str(k): (v if v is None else header_value(v)) for k, v in row.items()}


# ---------------------------------------------------------------------- cursor store


class CursorStore:
    """Keeps connector cursors as ``pgflow.cursors`` rows in one database.

    That database is also where the source is read, and it must be the workflow's
    database for exactly-once (the runner passes its own transaction). Give a DSN (a
    small pool is opened lazily, only for plain ``recv()``) or an open pool to share.
    """

    def __init__(
        self,
        db: str | AsyncConnectionPool[Any],
        *,
        prefix: str = "connector:",
        pool_size: int = 2,
        pooler: str | None = None,
    ) -> None:
        self.prefix = prefix
        self._pooler = pooler  # for the lazily opened pool (see pgflow.Builder.build)
        self._dsn = db if isinstance(db, str) else None
        self._pool: AsyncConnectionPool[Any] | None = None if isinstance(db, str) else db
        self._owns_pool = isinstance(db, str)
        self._pool_size = pool_size
        self._pool_lock = asyncio.Lock()

    def key(self, consumer_name: str) -> CursorKey:
        return CursorKey(self.prefix + consumer_name)

    async def pool(self) -> AsyncConnectionPool[Any]:
        async with self._pool_lock:
            if self._pool is None:
                assert self._dsn is not None
                self._pool = await _db.open_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._pool_size,
                    name="pgflow-connector",
                    pooler=self._pooler,
                )
            return self._pool

    async def load(
        self,
        conn: AsyncConnection[Any],
        consumer_name: str,
        stream: str | None = None,
        source: str | None = None,
    ) -> Position:
        """The stored position; a consumer without a row whose name ends in
        ``-<i>-of-<n>`` (a workflow connector's shard) starts where every shard of a
        complete other layout of that connector had read (its ``parallel_count``
        changed), its row created there in ``conn``'s transaction, recording ``stream``
        and ``source`` as :meth:`compare_and_set` does; else at the start."""
        key = self.key(consumer_name)
        position = await load_cursor(conn, key)
        # (<prefix><workflow>--<connector>, shard, count): see pgflow.log.names
        layout = split_shard(key.consumer)
        if position != Position.start() or layout is None:
            return position
        cur = await conn.execute(
            "SELECT count(*) FROM pgflow.cursors WHERE consumer = %s", (key.consumer,)
        )
        if (await cur.fetchone() or [0])[0]:
            return position  # a row at the start: nothing to inherit
        cur = await conn.execute(
            "SELECT substring(consumer from '-of-([0-9]+)$')::int, count(*),"
            " array_agg(snap::text) FROM pgflow.cursors"
            " WHERE consumer LIKE %s AND consumer ~ %s"
            " AND substring(consumer from '-of-([0-9]+)$')::int <> %s GROUP BY 1",
            (
                _like_prefix(layout[0]) + "-%",
                r"-[0-9]+-of-[0-9]+$",
                layout[2],
            ),
        )
        snapshot = inherited_snapshot(
            [(int(n), int(have), list(s)) for n, have, s in await cur.fetchall()]
        )
        if snapshot == START_SNAPSHOT:
            return position
        inherited = Position(snapshot)
        await upsert_cursor(conn, key, position, inherited, stream, source)
        return inherited

    async def compare_and_set(
        self,
        conn: AsyncConnection[Any],
        consumer_name: str,
        old: Position,
        new: Position,
        stream: str | None = None,
        source: str | None = None,
    ) -> bool:
        """Move the cursor ``old -> new`` in ``conn``'s transaction (creating it at
        ``old == start``). False when it is not at ``old``: someone else moved it.
        ``source``: the table read (recorded for ``pgflow prune``)."""
        return await upsert_cursor(conn, self.key(consumer_name), old, new, stream, source)

    async def close(self) -> None:
        if self._owns_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None


# ------------------------------------------------------------------------- connector


class Connector:
    """Tails ``stream`` with a cursor per consumer name kept in ``cursor_store``."""

    def __init__(
        self,
        stream: Source,
        cursor_store: CursorStore | str | AsyncConnectionPool[Any],
        translator: RowTranslator | None = None,
        *,
        batch_size: int = 100,
        poll_interval: float = 0.5,
        cursor_stream: str | None = None,
    ) -> None:
        if batch_size < 1 or poll_interval <= 0:
            raise ConfigError("batch_size and poll_interval must be positive")
        self.stream = stream
        self.cursor_store = (
            cursor_store if isinstance(cursor_store, CursorStore) else CursorStore(cursor_store)
        )
        #: ``translator``, else the stream's own (e.g. change rows), else the default
        self.translator: RowTranslator = (
            translator or getattr(stream, "translator", None) or default_translator
        )
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        #: recorded in pgflow.cursors.stream (pgflow.consumer_lag counts pgflow.events
        #: of that stream, so only set it for sources that are the event log)
        self.cursor_stream = cursor_stream
        #: the table read (``schema.table``), recorded in ``pgflow.cursors.source`` so
        #: ``pgflow prune`` knows who reads ``pgflow.changes``; None for queries
        self.source_table: str | None = getattr(stream, "table", None)
        self._wakers: set[asyncio.Event] = set()

    async def make(self, consumer_name: str) -> TableConsumer:
        return TableConsumer(self, consumer_name)

    async def erase(self, conn: AsyncConnection[Any], foreign_id: str) -> int:
        """Data erasure (``Workflow.delete_data``): when this connector reads pgflow's
        change log, remove the row images of the changes it would deliver for
        ``foreign_id``; the user's own tables are never touched. Returns the rows
        erased."""
        erase = getattr(self.stream, "erase_for", None)
        if erase is None:
            return 0
        return int(await erase(conn, self.translator, foreign_id))

    def wake(self) -> None:
        """Tell waiting ``recv()`` calls in this process to look again now."""
        for waker in self._wakers:
            waker.set()

    async def close(self) -> None:
        """Close the cursor store's own pool, if it opened one."""
        await self.cursor_store.close()


@dataclasses.dataclass(slots=True)
class _TxBatch:
    """One ``recv_batch_in`` batch: what it handed out, what is acked, what is written.

    Acks only count here; the cursor row is written once per batch (by the last ack or
    :meth:`TableConsumer.flush_in`), in the batch's transaction. Nothing here outlives
    that transaction: the next batch re-reads the stored cursor, so a rollback leaves
    no position advanced in memory.
    """

    conn: AsyncConnection[Any]
    written: Position  #: the cursor row's position in this transaction
    positions: list[Position]  #: of the events handed out, in order
    acked: int = 0  #: how many of them (a prefix) are acked


@dataclasses.dataclass(slots=True)
class _Delivered:
    position: Position
    acked: bool = False


class TableConsumer:
    """One consumer name's reader; transactional (``recv_batch_in``) or plain (``recv``)."""

    def __init__(self, connector: Connector, name: str) -> None:
        self.connector = connector
        self.name = name
        #: the cursor's name in the store: the source's label plus the consumer name,
        #: so two sources fed to connectors of the same name never share a cursor
        self.cursor_name = f"{connector.stream.label}:{name}"
        self._buffer: deque[tuple[Position, Row]] = deque()
        self._read_to: Position | None = None  # last position fetched (plain recv)
        self._written: Position | None = None  # last position stored (plain recv)
        self._idle_moved_at = -IDLE_ADVANCE_AFTER  # monotonic time of the last idle move
        self._write_lock = asyncio.Lock()
        self._delivered: deque[_Delivered] = deque()  # handed out, not yet committed
        self._batch: _TxBatch | None = None  # the open recv_batch_in batch
        self._wake = asyncio.Event()
        self._closed = False
        connector._wakers.add(self._wake)

    # -- exactly-once path -----------------------------------------------------------

    async def recv_batch_in(
        self, conn: AsyncConnection[Any], limit: int
    ) -> list[tuple[ConnectorEvent, Ack]]:
        """Read up to ``limit`` rows in the caller's transaction; acks move the cursor
        in that transaction, in order (see the module doc and :meth:`flush_in`).

        A row the translator rejects ends the batch; when it is first, this raises
        :class:`MalformedEvent` whose ``ack`` (in this transaction) moves past it.
        """
        store = self.connector.cursor_store
        if not await try_lock_shard(conn, store.key(self.cursor_name)):
            return []
        self._batch = None  # an earlier batch's transaction is over: forget it
        # Always the stored position: a rolled-back batch leaves nothing behind here.
        start = await store.load(
            conn, self.cursor_name, self.connector.cursor_stream, self.connector.source_table
        )
        read_or_idle = getattr(self.connector.stream, "read_or_idle", None)
        if read_or_idle is None:
            rows, idle = await self.connector.stream.read(conn, start, limit), None
        else:
            rows, idle = await read_or_idle(conn, start, limit)
        if idle is not None and _time.monotonic() - self._idle_moved_at >= IDLE_ADVANCE_AFTER:
            # Nothing new: now and then move the cursor to the read's snapshot, so
            # prune and lag see this reader caught up (one write per interval, in the
            # caller's transaction; a cursor someone else moved is left alone).
            self._idle_moved_at = _time.monotonic()
            await store.compare_and_set(
                conn,
                self.cursor_name,
                start,
                idle,
                self.connector.cursor_stream,
                self.connector.source_table,
            )
        good: list[tuple[Position, ConnectorEvent]] = []
        for position, row in rows:
            try:
                good.append((position, self.connector.translator(row)))
            except (ValueError, KeyError, TypeError) as exc:
                if good:
                    break
                batch = self._batch = _TxBatch(conn, start, [position])
                raise self._malformed(row, position, exc, self._tx_ack(batch, 0)) from exc
        batch = self._batch = _TxBatch(conn, start, [p for p, _ in good])
        return [(event, self._tx_ack(batch, i)) for i, (_, event) in enumerate(good)]

    def _tx_ack(self, batch: _TxBatch, index: int) -> Ack:
        """The ack of event ``index`` of ``batch``: in memory, but the batch's last ack
        writes the cursor (so a caller that acks everything needs no :meth:`flush_in`)."""

        async def ack() -> None:
            if batch is not self._batch:
                raise RuntimeError(
                    f"table consumer {self.name!r}: ack of a batch whose transaction is over"
                )
            if index < batch.acked:
                return  # acked already
            if index > batch.acked:
                raise RuntimeError(
                    f"table consumer {self.name!r}: acks must be called in order"
                    f" (event {index} of the batch acked before event {batch.acked})"
                )
            batch.acked += 1
            if batch.acked == len(batch.positions):
                await self._write(batch)

        return ack

    async def flush_in(self, conn: AsyncConnection[Any]) -> None:
        """Write the cursor for the acks given so far in ``conn``'s transaction (one
        compare-and-set). The runner calls this before it commits; it raises
        :class:`~pgflow.log.cursors.LostCursor` (roll back!) when someone else moved the
        cursor since the batch was read."""
        batch = self._batch
        if batch is not None and batch.conn is conn:
            await self._write(batch)

    async def _write(self, batch: _TxBatch) -> None:
        if batch.acked == 0:
            return
        target = batch.positions[batch.acked - 1]
        if target == batch.written:
            return
        store = self.connector.cursor_store
        if not await store.compare_and_set(
            batch.conn,
            self.cursor_name,
            batch.written,
            target,
            self.connector.cursor_stream,
            self.connector.source_table,
        ):
            self._batch = None
            raise LostCursor(str(store.key(self.cursor_name)))
        batch.written = target

    def _malformed(self, row: Row, position: Position, exc: Exception, ack: Ack) -> MalformedEvent:
        raw_id = row.get("id", position.after_id)
        return MalformedEvent(
            f"{type(exc).__name__}: {exc}",
            event_id=f"{self.connector.stream.label}:{raw_id}",
            payload=_jsonable(row),
            ack=ack,
            foreign_id=str(row["foreign_id"]) if row.get("foreign_id") is not None else None,
        )

    # -- at-least-once path ----------------------------------------------------------

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        """The next row after this consumer's position (own connections, own acks)."""
        while True:
            if self._closed:
                raise RuntimeError(f"table consumer {self.name!r} is closed")
            if self._buffer:
                position, row = self._buffer.popleft()
                entry = _Delivered(position)
                self._delivered.append(entry)
                ack = self._plain_ack(entry)
                try:
                    event = self.connector.translator(row)
                except (ValueError, KeyError, TypeError) as exc:
                    raise self._malformed(row, position, exc, ack) from exc
                return event, ack
            await self._fill()
            if not self._buffer:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.connector.poll_interval)

    async def _fill(self) -> None:
        pool = await self.connector.cursor_store.pool()
        async with pool.connection() as conn:
            if self._read_to is None:
                self._read_to = await self.connector.cursor_store.load(
                    conn,
                    self.cursor_name,
                    self.connector.cursor_stream,
                    self.connector.source_table,
                )
                self._written = self._read_to
            rows = await self.connector.stream.read(conn, self._read_to, self.connector.batch_size)
        if rows:
            self._read_to = rows[-1][0]
            self._buffer.extend(rows)

    def _plain_ack(self, entry: _Delivered) -> Ack:
        async def ack() -> None:
            if entry.acked:
                return
            entry.acked = True
            # Commit the longest acknowledged prefix: never pass an unacked row.
            upto: Position | None = None
            while self._delivered and self._delivered[0].acked:
                upto = self._delivered.popleft().position
            if upto is None:
                return
            async with self._write_lock:  # one write at a time, in ack order
                old, self._written = self._written, upto
                if old is None or old == upto:
                    return
                pool = await self.connector.cursor_store.pool()
                async with pool.connection() as conn:
                    # At-least-once path: a cursor someone else moved is left alone.
                    await self.connector.cursor_store.compare_and_set(
                        conn,
                        self.cursor_name,
                        old,
                        upto,
                        self.connector.cursor_stream,
                        self.connector.source_table,
                    )

        return ack

    async def close(self) -> None:
        self._closed = True
        self.connector._wakers.discard(self._wake)
        self._wake.set()


# --------------------------------------------------------------------------- helpers


async def add_tx_column(
    conn_or_dsn: AsyncConnection[Any] | str,
    table: str,
    *,
    column: str = "tx",
    id_column: str = "id",
) -> None:
    """Make ``table`` tail-able gap-free: add ``column xid8 NOT NULL DEFAULT
    pg_current_xact_id()``, the ``(tx, id)`` index and a trigger that stamps the column
    on INSERT whatever the INSERT says (all idempotent). The read also walks an index on
    ``id`` (usually the primary key).

    Existing rows get this transaction's id (they are all delivered, in id order).
    Rewrites the table (see the module doc for big tables).
    """
    name = _qualified(table)
    index = sql.Identifier(f"{table.split('.')[-1].strip(chr(34))}_{column}_{id_column}_idx")
    statements = [
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} xid8 NOT NULL DEFAULT pg_current_xact_id()"
        ).format(name, sql.Identifier(column)),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({}, {})").format(
            index, name, sql.Identifier(column), sql.Identifier(id_column)
        ),
        sql.SQL(
            "CREATE OR REPLACE TRIGGER pgflow_stamp_tx BEFORE INSERT ON {} FOR EACH ROW"
            " EXECUTE FUNCTION {}"
        ).format(
            name,
            sql.SQL("pgflow.stamp_tx()")
            if column == "tx"
            else sql.SQL("pgflow.stamp_tx_column({})").format(sql.Literal(column)),
        ),
    ]
    if isinstance(conn_or_dsn, str):
        conn = await _db.connect(conn_or_dsn)
        try:
            async with conn.transaction():
                for stmt in statements:
                    await conn.execute(stmt)
        finally:
            await conn.close()
    else:
        for stmt in statements:
            await conn_or_dsn.execute(stmt)
