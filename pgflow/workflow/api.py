"""The workflow API: trigger runs, look at them, move them from outside.

:class:`API` is what connector functions receive and what :class:`pgflow.Workflow`
extends. It runs in one of two modes:

* pool-backed (``wf.trigger(...)``): each call is its own short transaction on the
  process's pool, committed before it returns, then consumers are poked;
* bound (``wf.bind(conn)``): each call runs inside the caller's open transaction, in a
  savepoint, and commits with it (or not at all). The connector runner and the table
  connector use this for exactly-once triggering: the source cursor and the new run
  commit together. Nothing is poked (the transaction is not committed yet): whoever
  commits calls ``wf.poke()`` — or lets the consumers' polling timer find the events.

The connector runner may also bind an API to an optimistic :class:`~pgflow._batch_api.
Batch`: ``trigger`` then buffers the new run (written with the batch's other runs in
one statement), reads write the buffer first, and anything else sends the batch to the
per-event path (see :mod:`pgflow.workflow._batch_api`).
"""

from __future__ import annotations

import contextlib
import enum
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import AsyncConnection, errors

from pgflow.errors import ConfigError, InvalidTransition, NotFound, RunPaused
from pgflow.observability import current_traceparent, trigger_span
from pgflow.workflow import actions
from pgflow.workflow._batch_api import Batch, in_progress
from pgflow.workflow._engine import Engine, maybe_await
from pgflow.workflow.listing import RunId, RunReader
from pgflow.workflow.records import (
    PROCESSABLE_STATES,
    NewRun,
    RawRecord,
    Record,
    RunState,
    insert_run,
    load_run,
)

__all__ = ["API"]

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)

_RUN_NAMESPACE = uuid.UUID("6f1f6c2e-4a4b-4c1e-9a43-7067666c6f77")


def run_id_for(*parts: str) -> str:
    """A deterministic run id (uuid5) for idempotent triggers from outside event ids.

    Run ids are global (one ``records`` primary key for every workflow): two workflows
    fed by one source must not derive the same id from the same event. Use
    :meth:`API.run_id_for` (``api.run_id_for(ev.id)``), which puts the workflow's
    name first, or include the workflow in ``parts`` yourself.
    """
    return str(uuid.uuid5(_RUN_NAMESPACE, "\x1f".join(parts)))


class API(RunReader[T, S], Generic[T, S]):
    """Client operations on one workflow's runs (see the module doc for the two modes);
    the reads (``latest``, ``get``, ``exists``, ``wait_for``, ``list``) are
    :class:`~pgflow.workflow.listing.RunReader`'s."""

    def __init__(
        self,
        engine: Engine[T, S],
        conn: AsyncConnection[Any] | None = None,
        batch: Batch | None = None,
    ) -> None:
        self._engine = engine
        self._conn = conn
        self._batch = batch  # optimistic connector batch (conn is its connection)

    def run_id_for(self, *parts: str) -> str:
        """A deterministic run id of THIS workflow for an outside event: ``run_id_for(
        workflow, *parts)``. The idempotent-trigger pattern (``api.trigger(fid,
        run_id=api.run_id_for("shop", ev.id))``) stays correct when several workflows
        consume one source; ``wf.run_id_for(...)`` finds the run again."""
        return run_id_for(self.name, *parts)

    @property
    def conn(self) -> AsyncConnection[Any] | None:
        """The bound connection (None for the pool-backed API).

        In an optimistic connector batch, touching it sends the batch to the per-event
        path, where the function runs again and gets the connection as usual."""
        if self._batch is not None:  # raw SQL would run before the buffered triggers
            raise self._batch.abandon("the connector function uses api.conn")
        return self._conn

    def bind(self, conn: AsyncConnection[Any]) -> API[T, S]:
        """This API running inside ``conn``'s open transaction (never commits)."""
        return API(self._engine, conn)

    def poke(self) -> None:
        """Wake the workflow's consumers; call after committing a bound transaction."""
        self._engine.poke()

    # -- plumbing --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _tx(self, *, single: bool = False) -> AsyncIterator[AsyncConnection[Any]]:
        """A transaction (or savepoint when bound); ``single``: the body is one statement,
        so an autocommit connection needs no BEGIN/COMMIT round trips."""
        if self._batch is not None:
            raise self._batch.abandon("the connector function writes more than new runs")
        if self._conn is not None:
            async with self._conn.transaction():
                yield self._conn
            return
        pool = await self._engine.pool()
        async with pool.connection() as conn:
            if single and conn.autocommit:
                yield conn
            else:
                async with conn.transaction():
                    yield conn
        self._engine.poke()

    # -- starting runs ---------------------------------------------------------------

    async def trigger(
        self,
        foreign_id: str,
        initial: T | None = None,
        start_at: S | None = None,
        *,
        run_id: RunId | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Start a run for ``foreign_id`` at ``start_at`` (default: the graph's start)
        with object ``initial``; returns its run id.

        Raises :class:`pgflow.WorkflowInProgress` when the foreign id has a run in
        progress (concurrent triggers: exactly one wins). With an explicit ``run_id``
        (e.g. :func:`run_id_for` of an outside event id) a repeated trigger of the same
        run returns that id instead of raising: idempotent on the event.
        """
        engine = self._engine
        if not isinstance(foreign_id, str) or not foreign_id:
            raise ValueError("foreign_id must be a non-empty string")
        try:
            start = engine.statuses.coerce(start_at) if start_at is not None else None
        except ValueError as exc:
            raise InvalidTransition(f"workflow {self.name!r}: {exc}") from None
        start = start if start is not None else engine.graph.start
        if start not in engine.startable:
            raise InvalidTransition(
                f"workflow {self.name!r}: cannot start at {start.name}: it is not in the graph"
            )
        obj = initial if initial is not None else engine.objects.default()
        rid = uuid.UUID(str(run_id)) if run_id is not None else uuid.uuid4()
        terminal = engine.graph.is_terminal(start)
        attrs = {"workflow": self.name, "foreign_id": foreign_id, "run_id": str(rid)}
        with trigger_span(self.name, foreign_id, attrs) as tp:
            if self._batch is not None and not terminal:
                new = NewRun(
                    foreign_id=foreign_id,
                    run_id=rid,
                    status=start.name,
                    object_json=engine.objects.dump(obj),
                    traceparent=tp or current_traceparent(),
                    headers=headers,
                )
                return str(self._batch.add(new))
            try:
                async with self._tx(single=not terminal) as conn:
                    raw = await insert_run(
                        conn,
                        workflow=self.name,
                        foreign_id=foreign_id,
                        run_id=rid,
                        status=start.name,
                        object_json=engine.objects.dump(obj),
                        traceparent=tp or current_traceparent(),
                        run_state=RunState.COMPLETED if terminal else RunState.INITIATED,
                        headers=headers,
                    )
                    if terminal:
                        await engine.fire("complete", engine.make_run(raw, conn))
            except errors.UniqueViolation as exc:
                if run_id is not None and await self._run_exists(foreign_id, rid):
                    return str(rid)
                diag = exc.diag.constraint_name or ""
                if "one_active_run" in diag:
                    raise in_progress(self.name, foreign_id) from None
                if diag == "records_pkey":
                    raise ConfigError(
                        f"workflow {self.name!r}: run id {rid} is already used by another"
                        " run (run ids are global across workflows): derive it with"
                        " api.run_id_for(...), which includes the workflow"
                    ) from None
                raise
        return str(rid)

    async def _run_exists(self, foreign_id: str, run_id: uuid.UUID) -> bool:
        async with self._read() as conn:
            return await load_run(conn, self.name, foreign_id, run_id) is not None

    async def schedule(
        self,
        foreign_id: str,
        spec: str,
        *,
        initial: T | None = None,
        filter: Callable[[datetime], bool | Awaitable[bool]] | None = None,
    ) -> datetime:
        """Trigger ``foreign_id`` on the cron ``spec`` (e.g. ``"*/5 * * * *"``, UTC).

        The timer poller triggers once per tick (exactly once across processes); a tick
        that finds a run still in progress is skipped. Returns the next tick.
        Re-scheduling replaces the spec, the value and the filter.

        ``initial``: the object each tick's run starts with (luno
        ``WithScheduleInitialValue``); stored with the schedule, so any worker uses it.
        ``filter(tick) -> bool`` (may be async): called at each tick; False (or an
        error, logged) skips that tick (luno ``WithScheduleFilter``). A filter is Python
        code, not data: only processes that called ``schedule(..., filter=...)`` fire
        such a schedule — call it at start-up in every worker, as with luno.
        """
        from croniter import croniter

        if not isinstance(spec, str) or not croniter.is_valid(spec):
            raise ConfigError(f"invalid cron spec {spec!r} (e.g. '*/5 * * * *')")
        if filter is not None and not callable(filter):
            raise ConfigError(f"schedule filter must be callable, got {filter!r}")
        engine = self._engine
        initial_json = None if initial is None else engine.objects.dump(initial)
        next_at: datetime = croniter(spec, engine.clock.now()).get_next(datetime)
        async with self._tx(single=True) as conn:
            await conn.execute(
                "INSERT INTO pgflow.schedules (workflow, foreign_id, spec, next_at, initial,"
                " filtered) VALUES (%s, %s, %s, %s, %s::jsonb, %s)"
                " ON CONFLICT (workflow, foreign_id) DO UPDATE SET spec = excluded.spec,"
                " next_at = excluded.next_at, initial = excluded.initial,"
                " filtered = excluded.filtered",
                (self.name, foreign_id, spec, next_at, initial_json, filter is not None),
            )
        if filter is None:
            engine.schedule_filters.pop(foreign_id, None)
        else:
            engine.schedule_filters[foreign_id] = filter
        return next_at

    async def unschedule(self, foreign_id: str) -> bool:
        """Remove ``foreign_id``'s schedule; True when there was one."""
        self._engine.schedule_filters.pop(foreign_id, None)
        async with self._tx(single=True) as conn:
            cur = await conn.execute(
                "DELETE FROM pgflow.schedules WHERE workflow = %s AND foreign_id = %s",
                (self.name, foreign_id),
            )
            return cur.rowcount > 0

    # -- moving runs from outside ----------------------------------------------------

    async def update_status(self, foreign_id: str, status: S) -> Record[T, S]:
        """Move the run in progress to ``status`` if the graph allows that move from
        where it is; else :class:`pgflow.InvalidTransition` and nothing changes."""
        engine = self._engine
        async with self._tx() as conn:
            raw = await self._active(conn, foreign_id)
            run = engine.make_run(raw, conn)
            new = await engine.transition(run, status, change="update_status")
            assert new is not None  # row locked
            return self._record(new)

    async def callback(
        self, foreign_id: str, status: S, payload: Any = None
    ) -> Record[T, S] | None:
        """Deliver ``payload`` to the callbacks registered on ``status``.

        Each ``fn(run, payload)`` runs in this call's transaction until one returns a
        status, which must be one of its declared destinations. A run that is not at
        ``status`` (late or duplicate callback) is left alone: returns None. A *paused*
        run at ``status`` refuses the callback with :class:`RunPaused` — dropping it
        would leave the run waiting forever after ``resume`` — so the caller keeps the
        payload and delivers it again after the run is resumed (a connector retries it,
        then dead-letters it for ``pgflow dead-letters --replay``).
        """
        engine = self._engine
        try:
            target = engine.statuses.coerce(status)
        except ValueError as exc:
            raise InvalidTransition(f"workflow {self.name!r}: {exc}") from None
        specs = engine.graph.callbacks.get(target)
        if not specs:
            raise InvalidTransition(
                f"workflow {self.name!r}: no callback is registered on {target.name}"
            )
        async with self._tx() as conn:
            raw = await load_run(conn, self.name, foreign_id, lock=True)
            if raw is None:
                raise NotFound(f"workflow {self.name!r}: no run for foreign id {foreign_id!r}")
            if raw.status == target.name and raw.run_state is RunState.PAUSED:
                raise RunPaused(
                    f"workflow {self.name!r}: run {raw.run_id} of {foreign_id!r} is paused"
                    f" at {target.name}; the callback was not applied (resume the run, then"
                    " deliver it again)"
                )
            if raw.status != target.name or raw.run_state not in PROCESSABLE_STATES:
                return None
            run = engine.make_run(raw, conn)
            for spec in specs:
                dest = await maybe_await(spec.fn(run, payload))
                if run.changed:
                    return self._record(run._raw)
                if dest is not None:
                    new = await engine.transition(run, dest, change="callback", allowed=spec.to)
                    assert new is not None
                    return self._record(new)
            return None

    async def _active(self, conn: AsyncConnection[Any], foreign_id: str) -> RawRecord:
        raw = await load_run(conn, self.name, foreign_id, lock=True)
        if raw is None:
            raise NotFound(f"workflow {self.name!r}: no run for foreign id {foreign_id!r}")
        if raw.run_state not in PROCESSABLE_STATES:
            raise InvalidTransition(
                f"workflow {self.name!r}: run {raw.run_id} of {foreign_id!r} is "
                f"{raw.run_state}; it cannot move"
            )
        return raw

    async def _act(
        self, action: Callable[..., Awaitable[RawRecord]], foreign_id: str, *args: Any, **kw: Any
    ) -> Record[T, S]:
        """One of :mod:`pgflow.workflow.actions` on one run, in this API's transaction."""
        async with self._tx() as conn:
            return self._record(await action(conn, self.name, foreign_id, *args, **kw))

    async def pause(
        self, foreign_id: str, run_id: RunId | None = None, *, reason: str | None = None
    ) -> Record[T, S]:
        """Pause the run in progress (``reason`` is kept as ``run_state_reason``)."""
        hook = self._engine.state_hook(RunState.PAUSED)
        return await self._act(actions.pause, foreign_id, run_id, hook=hook, reason=reason)

    async def resume(
        self, foreign_id: str, run_id: RunId | None = None, *, reason: str | None = None
    ) -> Record[T, S]:
        """Continue a paused run: errors reset, its current step runs again."""
        return await self._act(actions.resume, foreign_id, run_id, reason=reason)

    async def cancel(
        self, foreign_id: str, run_id: RunId | None = None, *, reason: str | None = None
    ) -> Record[T, S]:
        """End the run for good (``reason`` is kept as ``run_state_reason``)."""
        hook = self._engine.state_hook(RunState.CANCELLED)
        return await self._act(actions.cancel, foreign_id, run_id, hook=hook, reason=reason)

    async def retry(
        self, foreign_id: str, run_id: RunId | None = None, *, reason: str | None = None
    ) -> Record[T, S]:
        """Run the current step again now (reset errors; unpause)."""
        return await self._act(actions.retry, foreign_id, run_id, reason=reason)

    async def delete_data(
        self, foreign_id: str, run_id: RunId | None = None, *, reason: str | None = None
    ) -> Record[T, S]:
        """Erase a finished run's personal data, keeping its events as the audit trail.

        Only a COMPLETED or CANCELLED run (or one whose data was already deleted:
        deletion is repeatable) qualifies; else :class:`pgflow.InvalidTransition`.
        The object is replaced by what the builder's ``custom_delete`` keeps of it
        (default: nothing), and the change-log rows the workflow's capture connectors
        delivered for this foreign id lose their row images. Two transactions:
        REQUESTED_DATA_DELETED, then DATA_DELETED; if the process dies in between, a
        worker's timer poller finishes the erasure.
        Bound to a connection both happen in the caller's transaction.
        """
        rec = await self._act(actions.request_data_deletion, foreign_id, run_id, reason=reason)
        try:
            async with self._tx() as conn:
                done = await actions.erase_data(
                    conn,
                    self.name,
                    foreign_id,
                    rec.run_id,
                    scrub=self._engine.scrub,
                    erase_copies=self._engine.erase_copies,
                )
        except psycopg.OperationalError:
            return rec  # the poller finishes it
        return rec if done is None else self._record(done)
