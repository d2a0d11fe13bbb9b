"""Timeouts: arm them when a run reaches a status, fire them when they are due.

* :class:`TimerArmer` — a consumer per timeout status: for each run that reaches the
  status it calls each of the status's ``timer(run, now)`` and stores the due times in
  ``pgflow.timeouts`` (one row per run, status, record version and timer, so
  re-delivery arms nothing twice). The first timeout that moves the run voids the
  others (their version no longer matches).
* :func:`fire_timeouts` — a job of the timer poller (:mod:`pgflow.workflow._poller`):
  fires due timeouts exactly once. The row is claimed with ``UPDATE ... SET completed =
  true`` on rows selected ``FOR UPDATE SKIP LOCKED`` in the same transaction as
  ``expire(run, now)``'s transition, so several worker processes share the work and a
  crash rolls the claim back with the transition; a timeout whose run moved on
  (version changed) is completed without firing.

This module owns the SQL that writes ``pgflow.timeouts`` (retention's prune of old rows
is :mod:`pgflow.ops.retention`'s).
"""

from __future__ import annotations

import enum
import logging
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from psycopg import AsyncConnection

from pgflow.errors import InvalidTransition
from pgflow.log.cursors import Consumer, CursorKey
from pgflow.log.events import Event
from pgflow.observability import metrics, step_span
from pgflow.workflow._engine import Engine, maybe_await
from pgflow.workflow._failures import contained, log_failure, record_error
from pgflow.workflow.graph import TimeoutSpec
from pgflow.workflow.records import PROCESSABLE_STATES, RawRecord, load_many

__all__ = ["TimerArmer", "arm", "fire_timeouts"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)


def _current(rec: RawRecord | None, status: str, version: int) -> bool:
    return (
        rec is not None
        and rec.version == version
        and rec.status == status
        and rec.run_state in PROCESSABLE_STATES
    )


class _Void(Exception):
    """The run moved while its timeout's ``expire`` ran: the timeout is void."""

    control_flow = True  #: not an error: spans do not record it as one


class TimerArmer(Generic[T, S]):
    """Arms ``pgflow.timeouts`` rows for runs reaching a timeout status (all of the
    status's timeouts, so one cursor per status whatever their number)."""

    def __init__(self, engine: Engine[T, S], specs: list[TimeoutSpec[S]], shard: int) -> None:
        self.engine = engine
        self.specs = specs
        spec = self.spec = specs[0]
        self.shard = shard
        self.name = f"{engine.name}/{spec.status.name}/timeout"
        opts = spec.options
        self.key = CursorKey(self.name, shard, opts.parallel_count)
        self.filter = engine.status_shard(spec.status, shard, opts.parallel_count)

    def make_consumer(self, pool: Any) -> Consumer:
        return self.engine.consumer(pool, self, self.spec.options)

    async def handle(self, events: list[Event], conn: AsyncConnection[Any]) -> None:
        records = await load_many(conn, [e.run_id for e in events if e.run_id is not None])
        now = self.engine.clock.now()
        for event in events:
            rec = records.get(event.run_id) if event.run_id is not None else None
            if rec is None or not _current(rec, event.type, event.version):
                continue
            for spec in self.specs:
                await arm(self.engine, spec, conn, rec, now, self.name)


async def arm(
    engine: Engine[T, S],
    spec: TimeoutSpec[S],
    conn: AsyncConnection[Any],
    rec: RawRecord,
    now: datetime,
    name: str,
    timeout_id: int | None = None,
) -> None:
    """Call ``timer(run, now)`` in a savepoint and store its due time.

    A timer that raises — or whose SQL fails — leaves nothing behind (its savepoint is
    rolled back, the batch goes on for the other runs and timers); the error is counted
    on the record (pause after ``pause_after_err_count``) and a *re-arm* row is stored,
    due after the backoff, for the poller to call ``timer`` again. Re-emitting the run's
    event instead (as step retries do) would run the step of this status again.
    ``timeout_id`` is that re-arm row when the poller calls.
    """
    try:
        async with conn.transaction():
            run = engine.make_run(rec, conn)
            due = await maybe_await(spec.timer(run, now))
            if due is not None and not isinstance(due, datetime):
                raise TypeError(f"timer returned {due!r}, not a datetime or None")
    except BaseException as exc:
        if not contained(exc):
            raise
        metrics.error(name, 0)
        log_failure(logger, f"{name}: timer {spec.name}", rec, exc)
        paused = await record_error(engine, conn, rec, exc, spec.options, retry_step=False)
        if paused is None:
            retry_at = now + spec.options.backoff(rec.err_count + 1)
            await _store(conn, rec, spec, retry_at, True, timeout_id)
        return
    if due is not None:
        due = due if due.tzinfo is not None else due.replace(tzinfo=UTC)
        await _store(conn, rec, spec, due, False, timeout_id)


async def _store(
    conn: AsyncConnection[Any],
    rec: RawRecord,
    spec: TimeoutSpec[S],
    at: datetime,
    rearm: bool,
    timeout_id: int | None,
) -> None:
    """Store a due time: a new row for (run, status, version, timer) — a re-delivered
    event arms nothing twice — or, for the poller's re-arm, the existing row again."""
    if timeout_id is not None:
        await conn.execute(
            "UPDATE pgflow.timeouts SET expire_at = %s, rearm = %s, completed = false"
            " WHERE id = %s",
            (at, rearm, timeout_id),
        )
        return
    await conn.execute(
        "INSERT INTO pgflow.timeouts"
        " (workflow, foreign_id, run_id, status, version, expire_at, timer, rearm)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (rec.workflow, rec.foreign_id, rec.run_id, rec.status, rec.version, at, spec.index,
         rearm),
    )  # fmt: skip


async def _claim_due(
    conn: AsyncConnection[Any], workflow: str, now: datetime | None, limit: int
) -> list[tuple[Any, ...]]:
    """Claim up to ``limit`` due timeouts (``completed = true``, rows taken ``FOR UPDATE
    SKIP LOCKED``): the caller's transaction commits or rolls back the claim together
    with what firing them did."""
    cur = await conn.execute(
        "UPDATE pgflow.timeouts t SET completed = true WHERE t.id IN ("
        " SELECT id FROM pgflow.timeouts WHERE workflow = %s AND NOT completed"
        " AND expire_at <= coalesce(%s, now()) ORDER BY expire_at LIMIT %s"
        " FOR UPDATE SKIP LOCKED)"
        " RETURNING t.id, t.run_id, t.status, t.version, t.timer, t.rearm",
        (workflow, now, limit),
    )
    return list(await cur.fetchall())


async def _postpone(
    conn: AsyncConnection[Any], timeout_id: int, now: datetime | None, backoff: Any
) -> None:
    """Unclaim a timeout whose ``expire`` failed, due again after ``backoff``."""
    await conn.execute(
        "UPDATE pgflow.timeouts SET completed = false,"
        " expire_at = coalesce(%s, now()) + %s WHERE id = %s",
        (now, backoff, timeout_id),
    )


async def fire_timeouts(
    engine: Engine[T, S], conn: AsyncConnection[Any], name: str, batch: int
) -> tuple[int, int]:
    """Fire up to ``batch`` due timeouts of ``engine``'s workflow in one transaction;
    returns (timeouts claimed, timeouts that moved their run)."""
    fired = 0
    async with conn.transaction():
        rows = await _claim_due(conn, engine.name, engine.clock.sql_now(), batch)
        if not rows:
            return 0, 0
        records = await load_many(conn, [r[1] for r in rows])
        now = engine.clock.now()
        for timeout_id, run_id, status, version, timer, rearm in rows:
            rec = records.get(run_id)
            try:
                specs = engine.graph.timeouts.get(engine.statuses.load(status), [])
            except ValueError:
                specs = []
            spec = specs[timer] if 0 <= timer < len(specs) else None
            if spec is None or rec is None or not _current(rec, status, version):
                continue  # the run moved on: the timeout is void, claimed as done
            if rearm:  # its timer() failed: call it again
                await arm(engine, spec, conn, rec, now, name, timeout_id)
                continue
            moved = await _expire(engine, conn, name, spec, rec, timeout_id, now)
            if moved is not None:
                fired += 1
                # a sibling timeout of this run in the same batch sees the move
                records[run_id] = moved
    if fired:
        engine.poke()
    return len(rows), fired


async def _expire(
    engine: Engine[T, S],
    conn: AsyncConnection[Any],
    name: str,
    spec: TimeoutSpec[S],
    rec: RawRecord,
    timeout_id: int,
    now: datetime,
) -> RawRecord | None:
    """Run ``expire`` in a savepoint; the run's record after it (None: not fired)."""
    attributes = {
        "workflow": engine.name,
        "status": rec.status,
        "foreign_id": rec.foreign_id,
        "run_id": str(rec.run_id),
        "consumer": name,
        "shard": 0,
    }
    try:
        with step_span(f"{engine.name} {rec.status} timeout", rec.traceparent, attributes) as tp:
            async with conn.transaction():  # savepoint: the promise of run.tx
                run = engine.make_run(rec, conn)
                dest = await maybe_await(spec.expire(run, now))
                if dest is not None and not run.changed:
                    if not isinstance(dest, engine.statuses.enum):
                        raise InvalidTransition(
                            f"expire returned {dest!r}, not a status",
                            workflow=engine.name,
                            foreign_id=run.foreign_id,
                            run_id=run.run_id,
                            from_status=run.status,
                        )
                    new = await engine.transition(
                        run, dest, change="timeout", allowed=spec.to, traceparent=tp
                    )
                    if new is None:  # moved concurrently: expire's writes roll back
                        raise _Void
        metrics.success(name, 0)
        return run._raw
    except _Void:
        return None
    except BaseException as exc:
        if not contained(exc):
            raise
        metrics.error(name, 0)
        backoff = spec.options.backoff(rec.err_count + 1)
        log_failure(logger, f"{name}: expire {spec.name}", rec, exc, f"; retrying in {backoff}")
        paused = await record_error(engine, conn, rec, exc, spec.options, retry_step=False)
        if paused is None:
            await _postpone(conn, timeout_id, engine.clock.sql_now(), backoff)
        return None
