"""The table connector's cursor store: which database keeps its ``pgflow.cursors`` rows.

The rows themselves are written only by :mod:`pgflow.log.cursor_rows` (the same
compare-and-set as the event log's consumers); this store names them (``prefix`` plus
the consumer name), owns the optional pool for plain ``recv()`` and knows how a
workflow connector's shard names encode their layout.
"""

from __future__ import annotations

import asyncio
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgflow import _db
from pgflow.log.cursor_rows import CursorKey, inherit_layout, load_cursor, upsert_cursor
from pgflow.log.names import split_shard
from pgflow.log.snapshots import Position

__all__ = ["CursorStore"]

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
        return await inherit_layout(conn, key, layout[0], layout[2], stream, source)

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
