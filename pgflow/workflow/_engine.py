"""The engine core one Workflow process shares: graph, codecs, hooks, connections.

Every part of a workflow (client API, step consumers, timer poller, connector runner,
``Run``) goes through one :class:`Engine` so that a process has exactly one bounded
pool, one :class:`~pgflow.log.listener.Listener` and one
:class:`~pgflow.log.listener.Notifier`, and so that every status move applies the same
rules: validated against the graph, terminal statuses complete the run and fire
``on_complete``, each change is one record update plus its event.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgflow import _db
from pgflow.errors import InvalidTransition
from pgflow.log.cursors import Consumer, CursorKey
from pgflow.log.events import Event
from pgflow.log.listener import Listener, Notifier
from pgflow.log.streamer import Filter
from pgflow.workflow import actions
from pgflow.workflow._codec import ObjectCodec, StatusCodec
from pgflow.workflow._options import Options
from pgflow.workflow.clock import Clock, SystemClock
from pgflow.workflow.graph import Graph
from pgflow.workflow.records import UNSET, RawRecord, Record, RunState, load_run, write_change
from pgflow.workflow.run import Run

__all__ = ["Engine", "maybe_await"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)
R = TypeVar("R")

Hooks = Mapping[str, tuple[Callable[..., Any], ...]]
_HOOK_FOR_STATE = {RunState.PAUSED: "pause", RunState.CANCELLED: "cancel"}


async def maybe_await(value: Awaitable[R] | R) -> R:
    """User functions may be ``async def`` or plain ``def``."""
    if inspect.isawaitable(value):
        return await value
    return value


class LogReader(Protocol):
    """What :meth:`Engine.consumer` runs: a step consumer, a timer armer, a hook runner."""

    key: CursorKey
    filter: Filter

    async def handle(self, events: list[Event], conn: AsyncConnection[Any]) -> None: ...


class Engine(Generic[T, S]):
    def __init__(
        self,
        graph: Graph[S],
        object_type: Any,
        dsn_or_pool: str | AsyncConnectionPool[AsyncConnection[Any]] | None,
        *,
        hooks: Hooks,
        pool_size: int = 10,
        custom_delete: Callable[[T], Any] | None = None,
        clock: Clock | None = None,
        pooler: str | None = None,
        listen_dsn: str | None = None,
    ) -> None:
        self.graph = graph
        #: what time it is for timeouts, retries and schedules (see pgflow.clock)
        self.clock: Clock = clock if clock is not None else SystemClock()
        #: ``fn(object) -> object`` (or None after scrubbing in place): what data
        #: deletion keeps of a run's object (luno ``WithCustomDelete``)
        self.custom_delete = custom_delete
        #: schedule filters registered in this process, by foreign id (see schedule())
        self.schedule_filters: dict[str, Callable[[Any], Any]] = {}
        self.name = graph.workflow
        self.objects: ObjectCodec[T] = ObjectCodec(object_type)
        self.statuses: StatusCodec[S] = StatusCodec(graph.statuses)
        self.hooks = hooks
        self.pool_size = pool_size
        #: statuses a run may be triggered at (any status the graph mentions)
        self.startable = frozenset(graph.used_statuses())
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._dsn: str | None = None
        self.owns_pool = not isinstance(dsn_or_pool, AsyncConnectionPool)
        self._pooler = pooler
        self._listen_dsn = listen_dsn
        self.configure(pooler=pooler, listen_dsn=listen_dsn)
        if isinstance(dsn_or_pool, AsyncConnectionPool):
            _db.check_pool(dsn_or_pool, pooler)  # (a pool's conninfo has no pgflow_pooler)
            self._pool = dsn_or_pool
            self._dsn = str(dsn_or_pool.conninfo)
        elif dsn_or_pool is not None:
            _db.validate_dsn(dsn_or_pool)
            self._dsn = dsn_or_pool
        self._pool_lock: asyncio.Lock | None = None
        self.listener: Listener | None = None
        self.notifier: Notifier | None = None

    # -- connections -----------------------------------------------------------------

    def configure(self, *, pooler: str | None = None, listen_dsn: str | None = None) -> None:
        """Set the pooler mode and LISTEN DSN (None: keep / ``$PGFLOW_*``); validated now."""
        if pooler is not None:
            self._pooler = pooler
        if listen_dsn is not None:
            _db.validate_dsn(listen_dsn)
            self._listen_dsn = listen_dsn
        _db.resolve_pooler(self._pooler)  # a typo fails at build time, not at first use

    @property
    def pooler(self) -> str:
        """``none``, ``session`` or ``transaction``: ``pooler=``, else the DSN's
        ``pgflow_pooler``, else ``$PGFLOW_POOLER``."""
        return _db.resolve_pooler(self._pooler, self.dsn)

    @property
    def listen_dsn(self) -> str | None:
        """Where the LISTEN session connects; None behind a transaction pooler without
        ``listen_dsn``/``$PGFLOW_LISTEN_DSN`` (consumers then poll)."""
        return _db.resolve_listen_dsn(self.dsn, self._listen_dsn, self._pooler)

    def set_dsn(self, dsn: str) -> None:
        """Use ``dsn`` (before the pool is opened; a shared pool is kept)."""
        _db.validate_dsn(dsn)
        if self._pool is None:
            self._dsn = dsn

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            self._dsn = _db.resolve_dsn(None)
        return self._dsn

    async def pool(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        """The process's bounded pool, opened on first use (autocommit connections:
        single-statement calls such as ``trigger`` cost one round trip and one commit)."""
        if self._pool is not None and not self._pool.closed:
            if self.notifier is None:
                self.notifier = Notifier(self._pool, self.listener)
                self.notifier.start()
            return self._pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None or self._pool.closed:
                self._pool = await _db.open_pool(
                    self.dsn,
                    max_size=self.pool_size,
                    name=f"pgflow:{self.name}",
                    pooler=self.pooler,
                    autocommit=True,
                )
                self.owns_pool = True
            if self.notifier is None:
                self.notifier = Notifier(self._pool, self.listener)
                self.notifier.start()
        return self._pool

    def consumer(
        self,
        pool: AsyncConnectionPool[Any],
        reader: LogReader,
        options: Options | None = None,
        **extra: Any,
    ) -> Consumer:
        """A log consumer of ``reader`` (its ``handle`` over its ``filter``, at its
        cursor ``key``), woken by the process's listener. ``options`` (a step's or a
        timeout's) give the batch size and the poll interval; ``extra``: any other
        :class:`~pgflow.log.cursors.Consumer` keyword."""
        if options is not None:
            extra = {
                "batch_size": options.batch_size,
                "poll_interval": options.polling_frequency.total_seconds(),
                **extra,
            }
        return Consumer(
            pool, reader.key, reader.filter, reader.handle, listener=self.listener, **extra
        )

    def status_shard(self, status: enum.Enum, shard: int, count: int) -> Filter:
        """The events of ``status`` in this workflow's log, shard ``shard`` of ``count``:
        what a step consumer or a timer armer of that status reads."""
        return Filter(stream=self.name, types=(status.name,), shard=shard, shard_count=count)

    def poke(self) -> None:
        """Wake this workflow's consumers (here and, via NOTIFY, elsewhere); after commit."""
        if self.notifier is not None:
            self.notifier.poke(self.name)

    async def close(self) -> None:
        if self.notifier is not None:
            await self.notifier.stop()
            self.notifier = None
        if self._pool is not None and self.owns_pool:
            await self._pool.close()
            self._pool = None

    # -- records and runs ------------------------------------------------------------

    def to_record(self, raw: RawRecord, *, obj: Any = UNSET) -> Record[T, S]:
        if obj is UNSET:
            obj = None if raw.object is None else self.objects.load(raw.object)
        assert raw.created_at is not None and raw.updated_at is not None
        return Record(
            workflow_name=raw.workflow,
            foreign_id=raw.foreign_id,
            run_id=str(raw.run_id),
            run_state=raw.run_state,
            status=self.statuses.load(raw.status),
            object=obj,
            created_at=raw.created_at,
            updated_at=raw.updated_at,
            version=raw.version,
            err_count=raw.err_count,
            last_error=raw.last_error,
            traceparent=raw.traceparent,
            meta=raw.meta,
        )

    async def scrub(self, stored: Any) -> str | None:
        """What data deletion keeps of a stored object: ``custom_delete`` applied to it
        (default: nothing). The admin functions call this as their ``scrub``."""
        if self.custom_delete is None or stored is None:
            return None
        obj = self.objects.load(stored)
        kept = await maybe_await(self.custom_delete(obj))
        return self.objects.dump(obj if kept is None else kept)

    async def erase_copies(self, conn: AsyncConnection[Any], foreign_id: str) -> None:
        """Erase what this workflow's connectors keep of ``foreign_id``'s data (the
        change log rows a capture connector delivered for it): each connector with an
        ``erase(conn, foreign_id)`` method is asked. The admin functions call this as
        their ``erase_copies``."""
        for spec in self.graph.connectors.values():
            erase = getattr(spec.connector, "erase", None)
            if erase is not None:
                await erase(conn, foreign_id)

    def make_run(self, raw: RawRecord, conn: AsyncConnection[Any]) -> Run[T, S]:
        return Run(self, raw, self.to_record(raw), conn)

    async def fire(self, kind: str, run: Run[T, S]) -> None:
        """Run the ``in_transaction=True`` ``on_<kind>`` hooks in the transaction of the
        change (errors propagate and roll that change back). The other hooks run after
        commit, from the event log (:mod:`pgflow.workflow._hooks`)."""
        for hook in self.hooks.get(f"{kind}:tx", ()):
            await maybe_await(hook(run))

    def allowed(self, status: S) -> set[S]:
        return self.graph.destinations(status)

    async def transition(
        self,
        run: Run[T, S],
        dest: Any,
        *,
        change: str,
        allowed: tuple[S, ...] | set[S] | None = None,
        traceparent: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> RawRecord | None:
        """Move ``run`` to ``dest`` in ``run.tx``: validate, write record + event, store
        the object, complete the run (and fire ``on_complete``) on a terminal status.

        Returns the new raw record, or None when the record changed concurrently (the
        caller decides: a step treats its event as stale; an API call retries).
        """
        try:
            target = self.statuses.coerce(dest)
        except ValueError as exc:
            raise InvalidTransition(
                f"workflow {self.name!r}: {exc}",
                workflow=self.name,
                foreign_id=run.foreign_id,
                run_id=run.run_id,
                from_status=run.status,
            ) from None
        allowed_set = set(allowed) if allowed is not None else self.allowed(run.status)
        if target not in allowed_set:
            names = ", ".join(sorted(s.name for s in allowed_set)) or "nothing"
            raise InvalidTransition(
                f"workflow {self.name!r}: {run.status.name} -> {target.name} is not allowed"
                f" for {run.foreign_id!r} ({run.status.name} may move to: {names})",
                workflow=self.name,
                foreign_id=run.foreign_id,
                run_id=run.run_id,
                from_status=run.status,
                to_status=target,
            )
        terminal = self.graph.is_terminal(target)
        new = await write_change(
            run.tx,
            run._raw,
            change=change,
            status=target.name,
            run_state=RunState.COMPLETED if terminal else RunState.RUNNING,
            object_json=self.objects.dump(run.object),
            reset_errors=True,
            traceparent=traceparent,
            headers=headers,
        )
        if new is None:
            return None
        run._moved(new)
        if terminal:
            await self.fire("complete", run)
        return new

    async def change_state(
        self, run: Run[T, S], state: RunState, reason: str | None = None
    ) -> None:
        """Pause or cancel ``run`` inside its transaction (``run.pause()``/``cancel()``)."""
        new = await actions.set_run_state(
            run.tx,
            self.name,
            run.foreign_id,
            run.run_id,
            state,
            object_json=self.objects.dump(run.object),
            reason=reason,
        )
        run._moved(new)
        run.changed = True
        kind = _HOOK_FOR_STATE.get(state)
        if kind:
            await self.fire(kind, run)

    async def save_and_repeat(self, run: Run[T, S]) -> None:
        """Store ``run.object`` at the same status with a new version and event (the
        step runs again when the event comes round); ``run.save_and_repeat()``."""
        locked = await load_run(run.tx, self.name, run.foreign_id, run.run_id, lock=True)
        if locked is None or locked.version != run.version:
            raise InvalidTransition(
                f"workflow {self.name!r}: run {run.run_id} of {run.foreign_id!r} moved "
                "while its step ran; nothing was saved",
                workflow=self.name,
                foreign_id=run.foreign_id,
                run_id=run.run_id,
            )
        new = await write_change(
            run.tx,
            locked,
            change="save_and_repeat",
            status=locked.status,
            run_state=RunState.RUNNING,
            object_json=self.objects.dump(run.object),
            reset_errors=True,
        )
        assert new is not None  # the row is locked
        run._moved(new)
        run.changed = True

    def state_hook(
        self, state: RunState
    ) -> Callable[[RawRecord, AsyncConnection[Any]], Awaitable[None]] | None:
        """An admin-function hook that fires this workflow's hooks for ``state``."""
        kind = _HOOK_FOR_STATE.get(state)
        if kind is None or not self.hooks.get(f"{kind}:tx"):
            return None

        async def hook(raw: RawRecord, conn: AsyncConnection[Any]) -> None:
            assert kind is not None
            await self.fire(kind, self.make_run(raw, conn))

        return hook
