"""The table connector and its consumers (see :mod:`pgflow.connectors.table`).

:class:`Connector` tails a :class:`~pgflow.connectors.table.Source`;
:class:`TableConsumer` is one consumer name's reader: transactional
(``recv_batch_in``, exactly-once with the caller's transaction) or plain (``recv``,
at-least-once). Cursor moves go through the :class:`CursorStore`, which writes them with
:mod:`pgflow.log.cursor_rows`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time as _time
from collections import deque
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgflow.connectors._base import Ack, ConnectorEvent, MalformedEvent
from pgflow.connectors._table_cursors import CursorStore
from pgflow.connectors._table_rows import Row, RowTranslator, default_translator, jsonable_row
from pgflow.connectors._table_source import Source
from pgflow.errors import ConfigError
from pgflow.log.cursor_rows import IDLE_ADVANCE_AFTER, LostCursor, try_lock_shard
from pgflow.log.snapshots import Position

__all__ = ["Connector", "TableConsumer"]


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
        start = await self._load(conn)
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
            await self._move(conn, start, idle)
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
        if not await self._move(batch.conn, batch.written, target):
            self._batch = None
            raise LostCursor(str(self.connector.cursor_store.key(self.cursor_name)))
        batch.written = target

    async def _load(self, conn: AsyncConnection[Any]) -> Position:
        """The stored cursor (inheriting another shard layout's, see
        :meth:`CursorStore.load`)."""
        c = self.connector
        return await c.cursor_store.load(conn, self.cursor_name, c.cursor_stream, c.source_table)

    async def _move(self, conn: AsyncConnection[Any], old: Position, new: Position) -> bool:
        """Compare-and-set the cursor ``old -> new`` in ``conn``'s transaction, recording
        what it reads (for lag and prune); False when someone else moved it."""
        c = self.connector
        return await c.cursor_store.compare_and_set(
            conn, self.cursor_name, old, new, c.cursor_stream, c.source_table
        )

    def _malformed(self, row: Row, position: Position, exc: Exception, ack: Ack) -> MalformedEvent:
        raw_id = row.get("id", position.after_id)
        return MalformedEvent(
            f"{type(exc).__name__}: {exc}",
            event_id=f"{self.connector.stream.label}:{raw_id}",
            payload=jsonable_row(row),
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
                self._read_to = await self._load(conn)
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
                    await self._move(conn, old, upto)

        return ack

    async def close(self) -> None:
        self._closed = True
        self.connector._wakers.discard(self._wake)
        self._wake.set()
