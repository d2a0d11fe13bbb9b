"""Waking readers when the log grows: LISTEN/NOTIFY, as hints.

One :class:`Listener` per process holds a dedicated autocommit LISTEN connection and
fans notifications out to in-process subscribers; a :class:`Notifier` coalesces pokes
and sends NOTIFY after the writers committed, from a pool connection, never inside
their transactions. Readers (:func:`pgflow.log.streamer.stream`,
:class:`pgflow.log.cursors.Consumer`) always keep a polling timer, so a lost
notification costs latency, never data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgflow import _db
from pgflow.errors import DatabaseUnavailable

__all__ = [
    "CHANNEL",
    "Listener",
    "Notifier",
    "Subscription",
    "acquire_listener",
    "release_listener",
]

logger = logging.getLogger(__name__)

#: The NOTIFY channel; the payload is the stream name whose log grew.
CHANNEL = "pgflow_events"


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
        self._stopping = False

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
        self._stopping = False
        self._conn = await self._connect()
        self._task = asyncio.create_task(self._run(), name="pgflow-listener")
        self._probe = asyncio.create_task(self._self_test(), name="pgflow-listener-probe")

    async def wait_connected(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        self._stopping = True  # as Notifier.stop: do not rely on the cancel alone
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
        while not self._stopping:
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
        while not self._stopping:
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
        self._stopping = False
        self.sent = 0  #: notifications sent, for tests and metrics

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
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
        # The flag, not only the cancel: a cancellation delivered while the task waits
        # inside the pool can be swallowed there (seen with a pool still growing), and
        # a task that missed it would wait for the next poke forever, and stop() with it.
        self._stopping = True
        self._dirty.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        while not self._stopping:
            await self._dirty.wait()
            if self._stopping:
                return
            try:
                await self.flush()
            except Exception as exc:  # never let the hint sender die: pollers cover
                logger.debug("notify failed (%s); readers will poll", exc)
                await asyncio.sleep(0.1)
