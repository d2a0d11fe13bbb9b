"""Time-driven work: timeouts, step retries, cron schedules, data erasure.

* :class:`TimerArmer` — a consumer per timeout status: for each run that reaches the
  status it calls each of the status's ``timer(run, now)`` and stores the due times in
  ``pgflow.timeouts`` (one row per run, status, record version and timer, so
  re-delivery arms nothing twice). The first timeout that moves the run voids the
  others (their version no longer matches).
* :class:`Poller` — one per Workflow process, every ``polling_frequency``:

  - fires due timeouts exactly once: the row is claimed with
    ``UPDATE ... SET completed = true`` on rows selected ``FOR UPDATE SKIP LOCKED``
    in the same transaction as ``expire(run, now)``'s transition, so several worker
    processes share the work and a crash rolls the claim back with the transition;
    a timeout whose run moved on (version changed) is completed without firing;
  - re-emits the current event of runs whose step failed once ``retry_at`` passed
    (see :mod:`pgflow.workflow._steps` for why retries are events);
  - resumes runs paused after too many errors once their ``pause_retry`` delay
    (``retry_at`` of a PAUSED run) has passed: luno's paused-records retry, except that
    a run paused by hand stays paused (its pause cleared ``retry_at``);
  - triggers cron schedules once per tick (row lock + ``next_at`` update in the
    trigger's transaction; ticks missed while no worker ran are skipped, not
    replayed);
  - finishes data erasures interrupted between their two transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import AsyncConnection

from pgflow.errors import InvalidTransition, WorkflowInProgress
from pgflow.log.cursors import Consumer, CursorKey
from pgflow.log.events import Event, NewEvent, append
from pgflow.log.streamer import Filter
from pgflow.observability import metrics, step_span
from pgflow.workflow import actions
from pgflow.workflow._engine import Engine, maybe_await
from pgflow.workflow._steps import contained, error_text, record_error
from pgflow.workflow.graph import TimeoutSpec
from pgflow.workflow.records import PROCESSABLE_STATES, RawRecord, load_many

__all__ = ["PAUSE_RETRY_REASON", "Poller", "TimerArmer"]

#: The run-state reason of a run resumed by ``pause_retry``.
PAUSE_RETRY_REASON = "pause_retry: resumed automatically"

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
        self.filter = Filter(
            stream=engine.name,
            types=(spec.status.name,),
            shard=shard,
            shard_count=opts.parallel_count,
        )

    def make_consumer(self, pool: Any) -> Consumer:
        opts = self.spec.options
        return Consumer(
            pool,
            self.key,
            self.filter,
            self.handle,
            listener=self.engine.listener,
            batch_size=opts.batch_size,
            poll_interval=opts.polling_frequency.total_seconds(),
        )

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
    except psycopg.OperationalError:
        raise
    except BaseException as exc:
        if not contained(exc):
            raise
        metrics.error(name, 0)
        logger.warning(
            "%s: timer %s failed for run %s (foreign id %r, attempt %d): %s",
            name,
            spec.name,
            rec.run_id,
            rec.foreign_id,
            rec.err_count + 1,
            error_text(exc),
            exc_info=exc,
        )
        paused = await record_error(
            engine,
            conn,
            rec,
            exc,
            spec.options,
            retry_step=False,
        )
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


class Poller(Generic[T, S]):
    """The per-process timer loop (see the module doc)."""

    def __init__(self, engine: Engine[T, S], interval: timedelta, batch: int = 100) -> None:
        self.engine = engine
        self.interval = interval.total_seconds()
        self.batch = batch
        self.name = f"{engine.name}/poller"
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self.fired = 0  #: timeouts fired by this process (tests, metrics)
        engine.clock.on_change(self.wake)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def stopping(self) -> bool:
        """Whether ``stop()`` was called (a supervisor then lets the loop end)."""
        return self._stopping.is_set()

    def wake(self) -> None:
        """Look for due work now (the clock jumped); safe from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    _loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        delay = 0.05
        failing = False
        while not self._stopping.is_set():
            try:
                busy = await self.tick()
                if failing:
                    logger.info("%s: recovered", self.name)
                failing = False
                delay = 0.05
            except (psycopg.OperationalError, OSError) as exc:
                if not failing:
                    logger.warning("%s: database unavailable (%s); retrying", self.name, exc)
                failing = True
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception:
                logger.exception("%s: tick failed; retrying", self.name)
                busy = False
            if not busy:
                await self._sleep(self.interval)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def tick(self) -> bool:
        """One pass over all timer work; True when a full batch suggests more is due."""
        pool = await self.engine.pool()
        busy = False
        async with pool.connection() as conn:
            for job in (
                self.fire_timeouts,
                self.emit_retries,
                self.resume_paused,
                self.fire_schedules,
                self.erase,
            ):
                if await job(conn) >= self.batch:
                    busy = True
        return busy

    # -- timeouts ---------------------------------------------------------------------

    async def fire_timeouts(self, conn: AsyncConnection[Any]) -> int:
        engine = self.engine
        fired = 0
        async with conn.transaction():
            cur = await conn.execute(
                "UPDATE pgflow.timeouts t SET completed = true WHERE t.id IN ("
                " SELECT id FROM pgflow.timeouts WHERE workflow = %s AND NOT completed"
                " AND expire_at <= coalesce(%s, now()) ORDER BY expire_at LIMIT %s"
                " FOR UPDATE SKIP LOCKED)"
                " RETURNING t.id, t.run_id, t.status, t.version, t.timer, t.rearm",
                (engine.name, engine.clock.sql_now(), self.batch),
            )
            rows = await cur.fetchall()
            if not rows:
                return 0
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
                    await arm(engine, spec, conn, rec, now, self.name, timeout_id)
                    continue
                moved = await self._expire(conn, spec, rec, timeout_id, now)
                if moved is not None:
                    fired += 1
                    # a sibling timeout of this run in the same batch sees the move
                    records[run_id] = moved
        self.fired += fired
        if fired:
            engine.poke()
        return len(rows)

    async def _expire(
        self,
        conn: AsyncConnection[Any],
        spec: TimeoutSpec[S],
        rec: RawRecord,
        timeout_id: int,
        now: datetime,
    ) -> RawRecord | None:
        """Run ``expire`` in a savepoint; the run's record after it (None: not fired)."""
        engine = self.engine
        attributes = {
            "workflow": engine.name,
            "status": rec.status,
            "foreign_id": rec.foreign_id,
            "run_id": str(rec.run_id),
            "consumer": self.name,
            "shard": 0,
        }
        try:
            with step_span(
                f"{engine.name} {rec.status} timeout", rec.traceparent, attributes
            ) as tp:
                async with conn.transaction():  # savepoint: the promise of run.tx
                    run = engine.make_run(rec, conn)
                    dest = await maybe_await(spec.expire(run, now))
                    if dest is not None and not run.changed:
                        if not isinstance(dest, engine.statuses.enum):
                            raise InvalidTransition(f"expire returned {dest!r}, not a status")
                        new = await engine.transition(
                            run, dest, change="timeout", allowed=spec.to, traceparent=tp
                        )
                        if new is None:  # moved concurrently: expire's writes roll back
                            raise _Void
            metrics.success(self.name, 0)
            return run._raw
        except _Void:
            return None
        except psycopg.OperationalError:
            raise
        except BaseException as exc:
            if not contained(exc):
                raise
            metrics.error(self.name, 0)
            backoff = spec.options.backoff(rec.err_count + 1)
            logger.warning(
                "%s: expire %s failed for run %s (foreign id %r, attempt %d): %s; retrying in %s",
                self.name,
                spec.name,
                rec.run_id,
                rec.foreign_id,
                rec.err_count + 1,
                error_text(exc),
                backoff,
                exc_info=exc,
            )
            paused = await record_error(
                engine,
                conn,
                rec,
                exc,
                spec.options,
                retry_step=False,
            )
            if paused is None:
                await conn.execute(
                    "UPDATE pgflow.timeouts SET completed = false,"
                    " expire_at = coalesce(%s, now()) + %s WHERE id = %s",
                    (engine.clock.sql_now(), backoff, timeout_id),
                )
            return None

    # -- step retries -----------------------------------------------------------------

    async def emit_retries(self, conn: AsyncConnection[Any]) -> int:
        async with conn.transaction():
            cur = await conn.execute(
                "UPDATE pgflow.records r SET retry_at = NULL WHERE r.run_id IN ("
                " SELECT run_id FROM pgflow.records WHERE workflow = %s"
                " AND retry_at <= coalesce(%s, now()) AND run_state IN ('INITIATED', 'RUNNING')"
                " ORDER BY retry_at LIMIT %s FOR UPDATE SKIP LOCKED)"
                " RETURNING r.run_id, r.workflow, r.foreign_id, r.status, r.version,"
                " r.traceparent, r.err_count, r.run_state",
                (self.engine.name, self.engine.clock.sql_now(), self.batch),
            )
            rows = await cur.fetchall()
            if rows:
                await append(
                    conn,
                    [
                        NewEvent(
                            stream=r[1],
                            type=r[3],
                            foreign_id=r[2],
                            run_id=r[0],
                            version=r[4],
                            headers={
                                "change": "retry",
                                "attempt": str(r[6] + 1),
                                "run_state": r[7],
                            },
                            traceparent=r[5],
                        )
                        for r in rows
                    ],
                )
        if rows:
            self.engine.poke()
        return len(rows)

    # -- pause retry ------------------------------------------------------------------

    async def resume_paused(self, conn: AsyncConnection[Any]) -> int:
        """Resume runs paused after too many errors whose ``pause_retry`` has passed."""
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT foreign_id, run_id FROM pgflow.records"
                " WHERE workflow = %s AND run_state = 'PAUSED'"
                " AND retry_at <= coalesce(%s, now())"
                " ORDER BY retry_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (self.engine.name, self.engine.clock.sql_now(), self.batch),
            )
            rows = await cur.fetchall()
            for foreign_id, run_id in rows:
                rec = await actions.resume(
                    conn, self.engine.name, foreign_id, run_id, reason=PAUSE_RETRY_REASON
                )
                logger.info(
                    "%s: run %s of %r resumed by pause_retry", self.name, rec.run_id, foreign_id
                )
        if rows:
            self.engine.poke()
        return len(rows)

    # -- schedules --------------------------------------------------------------------

    async def fire_schedules(self, conn: AsyncConnection[Any]) -> int:
        from croniter import croniter

        from pgflow.workflow.api import API, run_id_for

        engine = self.engine
        api: API[T, S] = API(engine, conn)
        triggered = 0
        async with conn.transaction():
            # a filtered schedule is fired only by a process that has its filter
            cur = await conn.execute(
                "SELECT foreign_id, spec, next_at, initial, filtered FROM pgflow.schedules"
                " WHERE workflow = %s AND next_at <= coalesce(%s, now())"
                " AND (NOT filtered OR foreign_id = ANY(%s))"
                " ORDER BY next_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (engine.name, engine.clock.sql_now(), list(engine.schedule_filters), self.batch),
            )
            rows = await cur.fetchall()
            now = engine.clock.now()
            for foreign_id, spec, tick, initial, filtered in rows:
                if not filtered or await self._passes(foreign_id, tick):
                    try:
                        await api.trigger(
                            foreign_id,
                            None if initial is None else engine.objects.load(initial),
                            run_id=run_id_for("schedule", engine.name, foreign_id, str(tick)),
                            headers={"schedule": spec, "tick": tick.isoformat()},
                        )
                        triggered += 1
                    except WorkflowInProgress:
                        logger.info(
                            "%s: schedule tick %s for %r skipped: a run is in progress",
                            self.name,
                            tick,
                            foreign_id,
                        )
                next_at = croniter(spec, max(now, tick)).get_next(datetime)
                await conn.execute(
                    "UPDATE pgflow.schedules SET next_at = %s, last_at = %s"
                    " WHERE workflow = %s AND foreign_id = %s",
                    (next_at, tick, engine.name, foreign_id),
                )
        if triggered:
            engine.poke()
        return len(rows)

    async def _passes(self, foreign_id: str, tick: datetime) -> bool:
        """The schedule filter's verdict on ``tick``; an error skips the tick (logged),
        as retrying it at every poll would spin (luno #161)."""
        fn = self.engine.schedule_filters.get(foreign_id)
        if fn is None:  # unscheduled here meanwhile
            return False
        try:
            ok = bool(await maybe_await(fn(tick)))
        except Exception as exc:
            logger.warning(
                "%s: schedule filter for %r failed at tick %s (tick skipped): %s",
                self.name,
                foreign_id,
                tick,
                error_text(exc),
            )
            return False
        if not ok:
            logger.info("%s: schedule tick %s for %r filtered out", self.name, tick, foreign_id)
        return ok

    # -- data erasure -----------------------------------------------------------------

    async def erase(self, conn: AsyncConnection[Any]) -> int:
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT foreign_id, run_id FROM pgflow.records WHERE workflow = %s"
                " AND run_state = 'REQUESTED_DATA_DELETED'"
                " AND updated_at < now() - interval '1s' LIMIT %s",
                (self.engine.name, self.batch),
            )
            rows = await cur.fetchall()
            for foreign_id, run_id in rows:
                try:
                    await actions.erase_data(
                        conn,
                        self.engine.name,
                        foreign_id,
                        run_id,
                        scrub=self.engine.scrub,
                        erase_copies=self.engine.erase_copies,
                    )
                except psycopg.OperationalError:
                    raise
                except Exception as exc:  # a failing custom_delete: retried next tick
                    logger.warning(
                        "%s: data deletion of %r (run %s) failed: %s",
                        self.name,
                        foreign_id,
                        run_id,
                        error_text(exc),
                    )
        if rows:
            self.engine.poke()
        return len(rows)
