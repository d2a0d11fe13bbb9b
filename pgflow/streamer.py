"""Reading the event log gap-free, and waking readers when it grows.

The read (:func:`read_batch`) is one statement that only returns events whose writing
transaction finished before the oldest transaction still running — the xid horizon —
ordered by ``(tx, id)``. Everything below the horizon is final, so a cursor on the pair
``(tx, id)`` never skips a late commit and never needs a "gap settle" timeout.

Wake-ups are hints: one :class:`Listener` per process holds a dedicated autocommit
LISTEN connection and fans notifications out to in-process subscribers;
a :class:`Notifier` coalesces pokes and sends NOTIFY after the writers committed, from
a pool connection, never inside their transactions. Readers always keep a polling
timer, so a lost notification costs latency, never data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from . import _db
from .errors import DatabaseUnavailable
from .events import EVENT_COLUMNS, Event, Position, event_from_row

__all__ = [
    "CHANNEL",
    "Filter",
    "Listener",
    "Notifier",
    "Subscription",
    "acquire_listener",
    "head_position",
    "held_back",
    "horizon_age",
    "read_batch",
    "release_listener",
    "stream",
]

logger = logging.getLogger("pgflow.streamer")

#: The NOTIFY channel; the payload is the stream name whose log grew.
CHANNEL = "pgflow_events"

#: First re-poll delay while committed events wait above the xid horizon (doubles,
#: capped at the polling interval).
_RECHECK_MIN = 0.002


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a reader wants: one stream, optionally some types, one shard."""

    stream: str
    types: tuple[str, ...] | None = None
    shard: int = 0
    shard_count: int = 1

    def __post_init__(self) -> None:
        if self.shard_count < 1 or not 0 <= self.shard < self.shard_count:
            raise ValueError(f"shard {self.shard} of {self.shard_count} is out of range")
        if self.types is not None and not self.types:
            raise ValueError("types must be None (all) or a non-empty tuple")


_HORIZON = "e.tx < pg_snapshot_xmin(pg_current_snapshot())"
_AFTER_PARAMS = "(%(tx)s::xid8, %(id)s::bigint)"


@lru_cache(maxsize=256)
def _read_sql(types: int, sharded: bool, lagged: bool, after: str = _AFTER_PARAMS) -> str:
    """The gap-free read for one filter shape; ``types`` is 0 (all), 1 (one) or 2 (many).

    Built per shape (not with "param IS NULL OR ..." tricks) so the prepared statement's
    generic plan walks an index in ``(tx, id)`` order from the cursor:

    * no type filter: ``(stream, tx, id)``;
    * one type: ``(stream, type, tx, id)``;
    * several types: one ordered index walk per type (LATERAL), merged. A plain
      ``type = ANY(...)`` cannot return ``(tx, id)`` order from that index, so
      Postgres would read and sort every matching event after the cursor per batch.

    The shard test is written as ``int4eq(...)`` rather than ``=``: the planner has
    no statistics for ``shard_hash % n`` and assumes 0.5% of rows match, which made
    it sort the whole stream instead of walking the index (35 ms vs 0.3 ms per batch
    on a 200k backlog, measured); a function call is estimated at 1/3.

    ``after`` is the SQL of the position to read after: the ``tx``/``id`` parameters,
    or columns of an outer query (the consumer reads its cursor row and the events in
    one statement).
    """
    ripe = ", e.created_at <= now() - %(lag)s::interval AS ripe" if lagged else ""
    where = [
        "e.stream = %(stream)s",
        f"(e.tx, e.id) > {after}",
        _HORIZON,
    ]
    if types == 1:
        where.insert(1, "e.type = %(type)s")
    elif types == 2:
        where.insert(1, "e.type = t.type")
    if sharded:
        where.append("int4eq(e.shard_hash %% %(shard_count)s::int4, %(shard)s::int4)")
    inner = (
        f"SELECT {EVENT_COLUMNS}{ripe} FROM pgflow.events e WHERE "
        + " AND ".join(where)
        + " ORDER BY e.tx, e.id LIMIT %(limit)s"
    )
    if types != 2:
        return inner
    return (
        "SELECT x.* FROM unnest(%(types)s::text[]) AS t(type)"
        f" CROSS JOIN LATERAL ({inner}) AS x"
        " ORDER BY x.tx, x.id LIMIT %(limit)s"
    )


def _params(filter: Filter, after: Position, limit: int) -> tuple[int, dict[str, Any]]:
    params: dict[str, Any] = {
        "stream": filter.stream,
        "tx": str(after.tx),
        "id": after.id,
        "limit": limit,
    }
    types = 0
    if filter.types is not None:
        distinct = sorted(set(filter.types))
        if len(distinct) == 1:
            types, params["type"] = 1, distinct[0]
        else:
            types, params["types"] = 2, distinct
    if filter.shard_count > 1:
        params["shard_count"] = filter.shard_count
        params["shard"] = filter.shard
    return types, params


async def read_batch(
    conn: AsyncConnection[Any],
    filter: Filter,
    after: Position,
    limit: int = 500,
    lag: timedelta | None = None,
) -> list[Event]:
    """Up to ``limit`` events after ``after``, in ``(tx, id)`` order, gap-free.

    With ``lag``, the batch stops at the first event younger than ``lag`` (it is not
    skipped: the cursor must never pass an event that was not delivered).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    types, params = _params(filter, after, limit)
    if lag is not None:
        params["lag"] = lag
    sql = _read_sql(types, filter.shard_count > 1, lag is not None)
    cur = await conn.execute(sql, params)
    return _events(await cur.fetchall(), lag is not None)


def _events(rows: Sequence[Sequence[Any]], lagged: bool) -> list[Event]:
    """Events from rows of :func:`_read_sql`; lagged: up to the first unripe one."""
    if not lagged:
        return [event_from_row(r) for r in rows]
    batch = []
    for row in rows:
        if not row[-1]:
            break  # too young: stop here, never skip past it
        batch.append(event_from_row(row))
    return batch


@lru_cache(maxsize=64)
def _held_back_sql(types: int, sharded: bool) -> str:
    where = ["e.stream = %(stream)s", "e.tx >= pg_snapshot_xmin(pg_current_snapshot())"]
    if types == 1:
        where.insert(1, "e.type = %(type)s")
    elif types == 2:
        where.insert(1, "e.type = ANY(%(types)s::text[])")
    if sharded:
        where.append("int4eq(e.shard_hash %% %(shard_count)s::int4, %(shard)s::int4)")
    return "SELECT EXISTS (SELECT FROM pgflow.events e WHERE " + " AND ".join(where) + ")"


async def held_back(conn: AsyncConnection[Any], filter: Filter) -> bool:
    """True when committed events of ``filter`` wait above the xid horizon.

    They are invisible to :func:`read_batch` until every transaction that started
    before them ends — often a moment later (a consumer committing its cursor, another
    writer). A reader that was woken for them should look again soon instead of
    sleeping a whole polling interval, because the transaction that holds them back
    may never send a notification of its own.
    """
    types, params = _params(filter, Position.start(), 1)
    cur = await conn.execute(_held_back_sql(types, filter.shard_count > 1), params)
    row = await cur.fetchone()
    return bool(row and row[0])


async def head_position(conn: AsyncConnection[Any], filter: Filter) -> Position:
    """The position of the newest final event of ``filter.stream`` (stream-from-head)."""
    cur = await conn.execute(
        "SELECT e.tx, e.id FROM pgflow.events e WHERE e.stream = %s"
        " AND e.tx < pg_snapshot_xmin(pg_current_snapshot())"
        " ORDER BY e.tx DESC, e.id DESC LIMIT 1",
        (filter.stream,),
    )
    row = await cur.fetchone()
    return Position(int(row[0]), int(row[1])) if row else Position.start()


async def horizon_age(conn: AsyncConnection[Any]) -> float:
    """Seconds the oldest xid-holding transaction has been open (0.0 when none).

    Such a transaction holds delivery back for every reader in the cluster (every
    database on the server): events committed after it started wait until it ends.
    Forgotten prepared (two-phase) transactions count too — they hold it forever.
    Exposed as a metric and in ``pgflow.consumer_lag``.
    """
    cur = await conn.execute(
        "SELECT coalesce(extract(epoch FROM max(clock_timestamp() - since)), 0) FROM ("
        " SELECT xact_start AS since FROM pg_stat_activity WHERE backend_xid IS NOT NULL"
        " UNION ALL SELECT prepared FROM pg_prepared_xacts) AS holders"
    )
    row = await cur.fetchone()
    return float(row[0]) if row else 0.0


class Subscription:
    """An in-process wake-up flag for one stream, set by the :class:`Listener`."""

    def __init__(self, listener: Listener | None, stream: str) -> None:
        self._listener = listener
        self.stream = stream
        self._flag = asyncio.Event()

    def set(self) -> None:
        self._flag.set()

    async def wait(self, timeout: float) -> bool:
        """Wait for a wake-up or ``timeout`` seconds; clear the flag; True if woken."""
        try:
            await asyncio.wait_for(self._flag.wait(), timeout)
            woken = True
        except TimeoutError:
            woken = False
        self._flag.clear()
        return woken

    def close(self) -> None:
        if self._listener is not None:
            self._listener._unsubscribe(self)


class Listener:
    """One dedicated autocommit LISTEN connection per process, fanned out in process.

    Start-up order is LISTEN, then wake every subscriber (they poll and catch up), then
    wait for notifications. After any connection failure it reconnects with backoff,
    re-LISTENs and wakes everyone again, so nothing committed during the outage waits
    for the next notification.

    ``dsn=None`` (behind a transaction pooler with no ``listen_dsn``: LISTEN needs a
    session) makes an in-process hub only: this process's own writes still wake its
    readers at once, other processes' writes are found by polling — logged once.

    After the first LISTEN it proves that notifications reach it: it sends one from
    another connection and waits for it (:attr:`verified`). Behind a transaction pooler
    the session that ran LISTEN is handed to other clients, so the test notification
    never arrives, and a WARNING names the fix (``PGFLOW_POOLER``/``PGFLOW_LISTEN_DSN``)
    instead of leaving a silent fall-back to polling.
    """

    #: seconds the self-test waits for its notification before warning
    probe_timeout = 5.0

    def __init__(
        self, dsn: str | None, *, channel: str = CHANNEL, health_check_interval: float = 5.0
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.health_check_interval = health_check_interval
        self._subs: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self._conn: AsyncConnection[Any] | None = None
        self._ready = asyncio.Event()
        self.connects = 0  #: successful (re)connections, for tests and metrics
        #: set once a notification sent from another session reached this one
        self.verified = asyncio.Event()
        self._probe_payload = f"pgflow-probe:{os.getpid()}:{secrets.token_hex(6)}"
        self._probe: asyncio.Task[None] | None = None

    def subscribe(self, stream: str) -> Subscription:
        sub = Subscription(self, stream)
        self._subs.setdefault(stream, set()).add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subs.get(sub.stream, set()).discard(sub)

    def wake(self, stream: str | None = None) -> None:
        """Wake subscribers of ``stream`` (all of them when ``None``)."""
        if stream is None:
            for subs in self._subs.values():
                for sub in subs:
                    sub.set()
            return
        for sub in self._subs.get(stream, ()):
            sub.set()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    async def start(self) -> None:
        """Connect and LISTEN; returns once listening (raises if the first connect fails)."""
        if self.dsn is None:
            logger.warning(
                "no LISTEN session: the database DSN goes through a transaction pooler "
                "(PGFLOW_POOLER=transaction) and no listen_dsn / PGFLOW_LISTEN_DSN is set; "
                "other processes' events are found by polling (polling_frequency)"
            )
            return
        self._conn = await self._connect()
        self._task = asyncio.create_task(self._run(), name="pgflow-listener")
        self._probe = asyncio.create_task(self._self_test(), name="pgflow-listener-probe")

    async def wait_connected(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        for task in (self._probe, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._probe = None
        self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        self._ready.clear()

    async def _connect(self) -> AsyncConnection[Any]:
        assert self.dsn is not None
        # A session of its own (never pooled): it only runs LISTEN and a health check.
        conn = await _db.connect(self.dsn, autocommit=True, pooler="none")
        await conn.execute(f'LISTEN "{self.channel}"')
        self.connects += 1
        self._ready.set()
        self.wake()  # catch up: anything committed before LISTEN is found by polling
        return conn

    async def _run(self) -> None:
        delay = 0.05
        outage_logged = False
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await self._connect()
                    if outage_logged:
                        logger.info("listener reconnected")
                    outage_logged = False
                    delay = 0.05
                await self._pump(self._conn)
            except (psycopg.Error, OSError, DatabaseUnavailable) as exc:
                self._ready.clear()
                if not outage_logged:
                    logger.warning("listener connection lost (%s); reconnecting", exc)
                    outage_logged = True
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.close()
                self._conn = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _self_test(self) -> None:
        """NOTIFY from a separate connection; warn if it does not come back in time.

        (Other processes' listeners receive it too and wake no one: no stream has
        that name.)"""
        assert self.dsn is not None
        try:
            conn = await _db.connect(self.dsn, autocommit=True, pooler="none")
            try:
                await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, self._probe_payload))
            finally:
                await conn.close()
            await asyncio.wait_for(self.verified.wait(), self.probe_timeout)
        except TimeoutError:
            logger.warning(
                "the LISTEN connection did not receive a test notification within %gs: "
                "if %s goes through a transaction pooler (pgbouncer pool_mode = "
                "transaction, RDS Proxy, Supavisor), set PGFLOW_POOLER=transaction and "
                "PGFLOW_LISTEN_DSN to a direct DSN; until then other processes' events "
                "are found by polling",
                self.probe_timeout,
                _db.redact(self.dsn),
            )
        except (psycopg.Error, OSError, DatabaseUnavailable) as exc:
            logger.debug("listener self-test could not run (%s)", exc)

    async def _pump(self, conn: AsyncConnection[Any]) -> None:
        while True:
            got_any = False
            async for note in conn.notifies(timeout=self.health_check_interval):
                got_any = True
                if note.payload == self._probe_payload:
                    self.verified.set()
                    continue
                self.wake(note.payload or None)
            if not got_any:
                # Idle: prove the connection is alive (a dropped network sends no FIN,
                # so without a deadline this probe could wait forever).
                try:
                    await asyncio.wait_for(
                        conn.execute("SELECT 1"), timeout=self.health_check_interval
                    )
                except TimeoutError:
                    raise psycopg.OperationalError("listener health check timed out") from None


# One Listener per process (per event loop, DSN and channel), shared by every workflow
# and reader in it: the fixed connection budget is one LISTEN connection, however many
# workflows a process runs.
_shared_listeners: dict[tuple[int, str | None, str], tuple[Listener, int]] = {}


async def acquire_listener(dsn: str | None, *, channel: str = CHANNEL) -> Listener:
    """The process's shared, started :class:`Listener` for ``dsn`` (reference-counted;
    None: an in-process hub without a LISTEN session, see :class:`Listener`)."""
    key = (id(asyncio.get_running_loop()), dsn, channel)
    entry = _shared_listeners.get(key)
    if entry is not None:
        _shared_listeners[key] = (entry[0], entry[1] + 1)
        return entry[0]
    listener = Listener(dsn, channel=channel)
    await listener.start()
    if key in _shared_listeners:  # another task started one meanwhile: use that one
        await listener.stop()
        return await acquire_listener(dsn, channel=channel)
    _shared_listeners[key] = (listener, 1)
    return listener


async def release_listener(listener: Listener) -> None:
    """Drop one reference to a listener from :func:`acquire_listener`; stop it at zero."""
    for key, (shared, refs) in list(_shared_listeners.items()):
        if shared is listener:
            if refs > 1:
                _shared_listeners[key] = (shared, refs - 1)
                return
            del _shared_listeners[key]
            break
    await listener.stop()


class Notifier:
    """Coalesced NOTIFY, sent after commit on a pool connection.

    ``poke(stream)`` is cheap and synchronous: it wakes local subscribers at once and
    marks the stream dirty; a background task sends one NOTIFY per dirty stream per
    flush, so a burst of commits costs one notification, and no writer ever holds the
    cluster-wide NOTIFY lock inside its own transaction.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        listener: Listener | None = None,
        *,
        channel: str = CHANNEL,
    ) -> None:
        self.pool = pool
        self.listener = listener
        self.channel = channel
        self._pending: set[str] = set()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0  #: notifications sent, for tests and metrics

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="pgflow-notifier")

    def poke(self, stream: str) -> None:
        if self.listener is not None:
            self.listener.wake(stream)
        self._pending.add(stream)
        self._dirty.set()

    async def flush(self) -> None:
        """Send the pending notifications now."""
        streams, self._pending = sorted(self._pending), set()
        self._dirty.clear()
        if not streams:
            return
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "SELECT pg_notify(%s, s) FROM unnest(%s::text[]) s",
                    (self.channel, streams),
                )
            self.sent += len(streams)
        except psycopg.Error as exc:  # a hint only: pollers will find the events
            logger.debug("notify failed (%s); readers will poll", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            try:
                await self.flush()
            except Exception as exc:  # never let the hint sender die: pollers cover
                logger.debug("notify failed (%s); readers will poll", exc)
                await asyncio.sleep(0.1)


async def stream(
    pool: AsyncConnectionPool[Any],
    filter: Filter,
    *,
    after: Position | None = None,
    listener: Listener | None = None,
    batch_size: int = 500,
    poll_interval: float = 1.0,
    from_head: bool = False,
    to_head: bool = False,
    lag: timedelta | None = None,
) -> AsyncIterator[list[Event]]:
    """Yield batches of events after ``after`` (or the head), forever or to the head.

    This is the stateless reader (reflex's ``Stream``): the caller keeps the position.
    For consumers whose cursor must commit with their effects use
    :class:`pgflow.cursors.Consumer`.
    """
    if batch_size < 1 or poll_interval <= 0:
        raise ValueError("batch_size and poll_interval must be positive")
    sub = listener.subscribe(filter.stream) if listener else None
    position = after or Position.start()
    first = True
    delay = 0.05
    recheck = _RECHECK_MIN
    try:
        while True:
            pending = False
            try:
                async with pool.connection() as conn:
                    if first and from_head:
                        position = await head_position(conn, filter)
                    first = False
                    batch = await read_batch(conn, filter, position, batch_size, lag)
                    if len(batch) < batch_size and not to_head and lag is None:
                        pending = await held_back(conn, filter)
                delay = 0.05
            except psycopg.OperationalError as exc:
                logger.warning("stream %s: read failed (%s); retrying", filter.stream, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if batch:
                position = batch[-1].position
                yield batch
            if len(batch) == batch_size:
                continue
            if to_head:
                return
            if pending:  # committed events wait for the horizon: look again soon
                await asyncio.sleep(recheck)
                recheck = min(recheck * 2, poll_interval)
                continue
            recheck = _RECHECK_MIN
            if sub is not None:
                await sub.wait(poll_interval)
            else:
                await asyncio.sleep(poll_interval)
    finally:
        if sub is not None:
            sub.close()
