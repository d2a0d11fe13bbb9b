"""Consumer cursors, advanced in the same transaction as the consumer's effects.

A consumer batch is ONE transaction::

    BEGIN
      pg_try_advisory_xact_lock(consumer, shard)   -- shard ownership, takes no xid
      SELECT cursor, the next chunk of its diff     -- one statement (pgflow.snapshots)
      handler(batch, conn)                          -- effects, in this transaction
      UPDATE cursor ... WHERE position = old        -- compare-and-set
    COMMIT

so a crash anywhere loses nothing and doubles nothing. The advisory lock makes each
(consumer, shard) run in one process at a time; it is released with the transaction,
so a killed process's shards are taken over at the next poll of another one. The CAS
fences anything that slips past the lock (a handler that ran on a stale view).

The cursor row's own SQL (create, load, compare-and-set, the shard lock) lives in
:mod:`pgflow.log.cursor_rows`, shared with the table connector; its names are
importable from here too.

Stability: :class:`Consumer`, :class:`CursorKey`, :class:`BatchOutcome` and
:class:`RetryBatchNow` are the reader API (``pgflow.Consumer``, ``pgflow.CursorKey``).
:func:`consume_once`, :func:`ensure_cursor`, :func:`load_cursor`,
:func:`advance_cursor` and :func:`try_lock_shard` are *advanced*: the building blocks
of consumers and connectors, exported for writing a reader of your own; they may change
between minor versions.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgflow.errors import ConfigError
from pgflow.log.cursor_rows import (
    IDLE_ADVANCE_AFTER,
    CursorKey,
    LostCursor,
    advance_cursor,
    ensure_cursor,
    load_cursor,
    position_from_row,
    try_lock_shard,
)
from pgflow.log.events import Event
from pgflow.log.listener import Listener
from pgflow.log.snapshots import CURSOR_ROW, Position
from pgflow.log.streamer import Batch, Filter, _batch, _params, _read_sql, leave_diff

__all__ = [
    "BatchHandler",
    "BatchOutcome",
    "Consumer",
    "CursorKey",
    "LostCursor",
    "RetryBatchNow",
    "advance_cursor",
    "consume_once",
    "ensure_cursor",
    "load_cursor",
    "try_lock_shard",
]

logger = logging.getLogger(__name__)

BatchHandler = Callable[[list[Event], AsyncConnection[Any]], Awaitable[None]]


class RetryBatchNow(Exception):
    """Raised by a batch handler to roll its batch back and run it again at once.

    Not an error: the handler learned something that changes how it must process the
    batch (e.g. a step turned out to write through ``run.tx``). Logged at INFO, retried
    without backoff.
    """


class BatchOutcome(enum.Enum):
    LOCKED = "locked"  #: another process holds this shard right now
    EMPTY = "empty"  #: nothing new has committed
    APPLIED = "applied"  #: a batch was handled and the cursor moved
    LOST = "lost"  #: the CAS failed; effects were rolled back


@dataclass(frozen=True, slots=True)
class BatchResult:
    outcome: BatchOutcome
    events: int = 0
    position: Position | None = None


@lru_cache(maxsize=256)
def _consume_sql(types: int, sharded: bool, lagged: bool) -> str:
    """Cursor row and the next chunk of its diff in ONE statement.

    One round trip instead of two: at the tail a consumer runs many small batches, and
    each round trip it saves is CPU the writers get back. (The advisory lock stays a
    separate, earlier statement: this statement must run after the lock is held, or it
    could read a cursor the previous owner has just moved.)
    """
    read = _read_sql(types, sharded, lagged, CURSOR_ROW)
    # The cursor's columns and the diff's s2/lo/hi are the same on every row: sent on
    # the first only (parsing them 500 times cost the client more than a round trip).
    first = "CASE WHEN coalesce(r.__n, 1) = 1 THEN {} END"
    once = ", ".join(
        first.format(col)
        for col in (
            "c.snap::text",
            "c.upto::text",
            "c.after_id",
            "c.lo",
            "c.hi",
            # only wanted (and only computed) when nothing is read: see _read_at_cursor
            "CASE WHEN r.__id IS NULL THEN pg_current_snapshot()::text END",
            f"r.__id IS NULL AND c.updated_at < now() - interval '{IDLE_ADVANCE_AFTER} seconds'",
            "r.s2",
            "r.lo",
            "r.hi",
        )
    )
    event_columns = ", ".join(f"r.{name}" for name in Event._fields)
    ripe = ", r.ripe" if lagged else ""
    return (
        f"SELECT {once}, r.__id, {event_columns}{ripe}"
        " FROM pgflow.cursors c"
        f" LEFT JOIN LATERAL (SELECT *, row_number() OVER (ORDER BY __id) AS __n FROM ({read})"
        " AS x) AS r ON true"
        " WHERE c.consumer = %(c_consumer)s AND c.shard = %(c_shard)s"
        " AND c.shard_count = %(c_shard_count)s"
        " ORDER BY r.__id"
    )


async def _read_at_cursor(
    conn: AsyncConnection[Any],
    key: CursorKey,
    filter: Filter,
    batch_size: int,
    lag: timedelta | None,
) -> tuple[Position, Batch]:
    """(the stored cursor, the batch after it); creates a missing cursor row."""
    types, params = _params(filter, Position.start(), batch_size)
    params.update(c_consumer=key.consumer, c_shard=key.shard, c_shard_count=key.shard_count)
    if lag is not None:
        params["lag"] = lag
    sql = _consume_sql(types, filter.shard_count > 1, lag is not None)
    cur = await conn.execute(sql, params)
    rows = await cur.fetchall()
    if not rows:
        # No cursor row yet (the caller skipped ensure_cursor): create it — at the start
        # of the log, or where an old layout of this consumer had read — and read there.
        await ensure_cursor(conn, key, filter)
        cur = await conn.execute(sql, params)
        rows = await cur.fetchall()
        if not rows:  # deleted again at once by someone else: try again next batch
            raise LostCursor(str(key))
    # Columns: 0-4 the stored position, 5 this statement's snapshot, 6 "idle long
    # enough to move", then the read (s2, lo, hi, __id, event columns), NULL if none.
    stored = position_from_row(rows[0])
    if rows[0][7] is None:  # the LEFT JOIN found nothing new
        if stored.upto is not None:  # an exhausted diff: go on from its end
            return stored, await leave_diff(conn, filter, stored.upto, batch_size, lag)
        if rows[0][6] and stored.snapshot != rows[0][5]:
            # Idle for a while: move the snapshot to this statement's own (nothing of
            # this filter committed in between, or it would have been read), so prune
            # and the lag view see this consumer caught up.
            return stored, Batch([], moved=Position(rows[0][5]))
        return stored, _batch(stored, [], batch_size, False)
    return stored, _batch(stored, rows, batch_size, lag is not None, skip=7)


async def consume_once(
    pool: AsyncConnectionPool[Any],
    key: CursorKey,
    filter: Filter,
    handler: BatchHandler,
    *,
    batch_size: int = 500,
    lag: timedelta | None = None,
) -> BatchResult:
    """Run one batch transaction (see the module doc). Handler errors propagate."""
    async with pool.connection() as conn:
        try:
            async with conn.transaction():
                if not await try_lock_shard(conn, key):
                    return BatchResult(BatchOutcome.LOCKED)
                old, batch = await _read_at_cursor(conn, key, filter, batch_size, lag)
                new = batch.position
                if new is None:
                    return BatchResult(BatchOutcome.EMPTY, 0, old)
                if batch.events:
                    await handler(batch.events, conn)
                if not await advance_cursor(conn, key, old, new):
                    raise LostCursor(str(key))
                if not batch.events:
                    return BatchResult(BatchOutcome.EMPTY, 0, new)
                return BatchResult(BatchOutcome.APPLIED, len(batch), new)
        except LostCursor:
            logger.info("%s: cursor moved concurrently; batch rolled back", key)
            return BatchResult(BatchOutcome.LOST)


class Consumer:
    """Runs ``handler`` over a filtered event stream, one batch transaction at a time.

    Wakes on notifications for its stream (via the process's :class:`Listener`) and
    polls every ``poll_interval`` seconds regardless. Connection failures and handler
    errors are retried with exponential backoff from the stored cursor; the loop only
    ends when ``stop()`` is called.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        key: CursorKey,
        filter: Filter,
        handler: BatchHandler,
        *,
        listener: Listener | None = None,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        lag: timedelta | None = None,
        max_backoff: float = 30.0,
        on_batch: Callable[[BatchResult], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        if poll_interval <= 0:
            raise ConfigError("poll_interval must be positive")
        self.pool = pool
        self.key = key
        self.filter = filter
        self.handler = handler
        self.listener = listener
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lag = lag
        self.max_backoff = max_backoff
        self.on_batch = on_batch
        self.position: Position | None = None  #: last committed position seen
        self.errors = 0
        self._cursor_created = False
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask the loop to exit after the current batch (which commits or rolls back)."""
        self._stopping.set()

    def stopping(self) -> bool:
        """Whether ``stop()`` was called (a supervisor then lets the loop end)."""
        return self._stopping.is_set()

    async def run(self) -> None:
        sub = self.listener.subscribe(self.filter.stream) if self.listener else None
        backoff = 0.0
        failing_since_logged = False
        try:
            while not self._stopping.is_set():
                try:
                    if not self._cursor_created:
                        async with self.pool.connection() as conn:
                            await ensure_cursor(conn, self.key, self.filter)
                        self._cursor_created = True
                    result = await consume_once(
                        self.pool,
                        self.key,
                        self.filter,
                        self.handler,
                        batch_size=self.batch_size,
                        lag=self.lag,
                    )
                except RetryBatchNow as exc:
                    logger.info("%s: batch rolled back to run again (%s)", self.key, exc)
                    continue
                except (psycopg.OperationalError, OSError) as exc:
                    result = None
                    self.errors += 1
                    if not failing_since_logged:
                        logger.warning("%s: database unavailable (%s); retrying", self.key, exc)
                        failing_since_logged = True
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._stopping.is_set() or task is None or task.cancelling():
                        raise  # our own shutdown
                    # a stray CancelledError from the handler: an error like any other
                    result = None
                    self.errors += 1
                    logger.exception("%s: batch handler failed; retrying", self.key)
                except Exception:
                    result = None
                    self.errors += 1
                    logger.exception("%s: batch handler failed; retrying", self.key)
                if result is None:
                    backoff = min(max(backoff * 2, 0.05), self.max_backoff)
                    await self._sleep(backoff, None)
                    continue
                if failing_since_logged:
                    logger.info("%s: recovered", self.key)
                    failing_since_logged = False
                backoff = 0.0
                if result.position is not None:
                    self.position = result.position
                if self.on_batch is not None:
                    self.on_batch(result)
                if result.outcome is BatchOutcome.APPLIED and result.events == self.batch_size:
                    continue  # more is waiting
                await self._sleep(self.poll_interval, sub)
        finally:
            if sub is not None:
                sub.close()

    async def _sleep(self, seconds: float, sub: Any) -> None:
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if sub is not None:
            waits.append(asyncio.ensure_future(sub.wait(seconds)))
        done, pending = await asyncio.wait(
            waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        _ = done
