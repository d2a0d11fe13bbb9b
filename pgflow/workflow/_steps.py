"""Step consumers: run a step for every run that reaches its status, exactly once.

One :class:`pgflow.log.cursors.Consumer` per (step status, shard) reads the workflow's
events of that type (``Filter(stream=workflow, types=(STATUS,), shard=i,
shard_count=parallel_count)``, consumer name ``"<workflow>/<STATUS>"``). Its batch
handler runs in the batch transaction that also moves the cursor, so a step's effects
— the record update, the next event and the app's own writes through ``run.tx`` —
commit exactly once together with "this event was handled".

Per event: load the record (one query per batch, no row locks: nothing takes an xid
until the first write, so no xid is held open while user code runs); skip
stale events (``event.version != record.version``: the run moved on) and runs that are
not processable; run the step inside a savepoint; write the transition by
compare-and-set on the record version.

Failures. A step that raises is rolled back to its savepoint — its batch-mates are
unaffected — and the error is recorded on the record (``err_count``, ``last_error``)
with ``retry_at = now() + err_backoff * 2**(n-1)``. The cursor moves on: a failing run
never blocks its shard. The timer poller (:mod:`pgflow.workflow._timers`) re-emits the run's
event when ``retry_at`` has passed, so the retry is an ordinary event. We chose this
over in-process retries (tenacity) because sleeping inside a batch would hold the
batch transaction — and with it an open xid (VACUUM's horizon) and the shard — for the
whole backoff, and a retry queue in memory would be lost with the process. After
``pause_after_err_count`` consecutive errors the run is paused (``on_pause`` fires);
``resume``/``retry`` start it again.

Fast path. A step that never touches ``run.tx`` writes nothing, so it needs no
savepoint, and its transition can join the batch's single bulk write (one statement
for every record update and event of the batch, compare-and-set per record). The
first time a step is seen using ``run.tx`` (``Run.tx`` records access) the consumer
switches that step to a savepoint per event; had it failed in that same call, the
whole batch is rolled back and retried (:class:`RetryBatch`) so its writes cannot
leak. Workflows with in-transaction ``on_complete`` hooks (which may write) always
use savepoints.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import traceback as _traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from uuid import UUID

import psycopg
from psycopg import AsyncConnection

from pgflow.errors import InvalidTransition
from pgflow.log.cursors import BatchOutcome, BatchResult, Consumer, CursorKey, RetryBatchNow
from pgflow.log.events import Event
from pgflow.log.streamer import Filter
from pgflow.observability import metrics, step_span
from pgflow.workflow._engine import Engine, maybe_await
from pgflow.workflow._options import Options
from pgflow.workflow.graph import StepSpec
from pgflow.workflow.records import PROCESSABLE_STATES, RECORD_COLUMNS, RawRecord, RunState

__all__ = [
    "AUTO_PAUSE_REASON",
    "RetryBatch",
    "StepConsumer",
    "contained",
    "error_text",
    "record_error",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)


class _Stale(Exception):
    """The record moved while the step ran: its effects are rolled back, event skipped."""

    control_flow = True  #: not an error: spans do not record it as one


class RetryBatch(RetryBatchNow):
    """A step that wrote through ``run.tx`` failed outside a savepoint: the whole batch
    is rolled back and retried (now with savepoints for that step)."""

    control_flow = True  #: not an error: spans do not record it as one


# The fast path's transitions, written for a whole batch in one statement:
# compare-and-set every record on its version, append one event per record that moved.
_BULK_MOVE = """
WITH v AS (
    SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::text[], %s::text[], %s::text[],
                         %s::text[])
        AS v(run_id, version, status, run_state, object, traceparent)
), u AS (
    UPDATE pgflow.records r
    SET version = r.version + 1, updated_at = now(), status = v.status,
        run_state = v.run_state, object = v.object::jsonb, err_count = 0,
        last_error = NULL, retry_at = NULL,
        traceparent = coalesce(v.traceparent, r.traceparent),
        meta = CASE WHEN r.run_state = v.run_state THEN r.meta
                    ELSE r.meta - 'run_state_reason' END
    FROM v WHERE r.run_id = v.run_id AND r.version = v.version
    RETURNING r.run_id, r.workflow, r.foreign_id, r.status, r.run_state, r.version,
              r.traceparent
)
INSERT INTO pgflow.events (stream, type, foreign_id, run_id, version, headers, traceparent)
SELECT u.workflow, u.status, u.foreign_id, u.run_id, u.version,
       jsonb_build_object('run_state', u.run_state, 'change', 'step'), u.traceparent
FROM u
RETURNING run_id
"""


_ERROR_TEXT_MAX = 2000


def error_text(exc: BaseException, *, traceback: bool = False) -> str:
    """``Type: message`` (then, with ``traceback``, the start of the traceback), cut to
    2000 characters and without NUL characters (a text column refuses them: recording
    the error must not fail because of the error's own message)."""
    text = f"{type(exc).__name__}: {exc}"
    if traceback:
        tb = "".join(_traceback.format_exception(exc)).rstrip()
        text = f"{text}\n{tb}"
    text = text.replace("\x00", "\\x00")
    return text if len(text) <= _ERROR_TEXT_MAX else text[: _ERROR_TEXT_MAX - 3] + "..."


def contained(exc: BaseException) -> bool:
    """Whether an exception from user code is that run's failure (True) or must end the
    consumer (False).

    Every ``Exception`` is the run's. So is a ``CancelledError`` the user's code raised
    by awaiting a task that was cancelled — unless *this* task is being cancelled
    (``Task.cancelling()``): then it is our shutdown and must propagate.
    KeyboardInterrupt, SystemExit and GeneratorExit always propagate.
    """
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is None or task.cancelling() == 0
    return False


#: The run-state reason of a run paused by ``pause_after_err_count`` (luno's words).
AUTO_PAUSE_REASON = "max error retry threshold hit"


async def record_error(
    engine: Engine[Any, Any],
    conn: AsyncConnection[Any],
    rec: RawRecord,
    exc: BaseException,
    options: Options,
    *,
    retry_step: bool = True,
) -> RawRecord | None:
    """Count a failed attempt on ``rec``; schedule its retry or pause the run, as the
    failing consumer's ``options`` say (``err_backoff``, ``pause_after_err_count``,
    ``pause_retry``).

    Compare-and-set on the version without bumping it: the retry event re-emitted by
    the poller carries the same version, so it is still current when it arrives.
    ``retry_step=False`` (timers: they schedule their own retry) only counts and
    pauses; no event is re-emitted, so the step of the status does not run again.

    A pause here records :data:`AUTO_PAUSE_REASON` and, with ``pause_retry``, sets the
    paused run's ``retry_at`` to when the timer poller resumes it (a pause by hand
    clears ``retry_at``, so only automatic pauses are resumed automatically).
    """
    err_backoff_s = options.err_backoff.total_seconds()
    pause_after, pause_retry = options.pause_after_err_count, options.pause_retry
    count = rec.err_count + 1
    pausing = pause_after is not None and count >= pause_after
    now = engine.clock.sql_now()
    cur = await conn.execute(
        "UPDATE pgflow.records SET err_count = err_count + 1, last_error = %s,"
        " retry_at = CASE WHEN %s THEN NULL WHEN NOT %s THEN retry_at"
        "   ELSE coalesce(%s, now())"
        "        + make_interval(secs => least(%s * 2 ^ least(err_count, 30), 600))"
        " END,"
        " updated_at = now()"
        " WHERE run_id = %s AND version = %s RETURNING err_count",
        (
            error_text(exc, traceback=True),
            pausing,
            retry_step,
            now,
            err_backoff_s,
            rec.run_id,
            rec.version,
        ),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    if pausing:
        from pgflow.workflow.actions import pause

        logger.warning(
            "%s: run %s of %r paused after %d errors%s: %s",
            rec.workflow,
            rec.run_id,
            rec.foreign_id,
            row[0],
            f" (resumed in {pause_retry})" if pause_retry is not None else "",
            error_text(exc),
        )
        paused = await pause(
            conn,
            rec.workflow,
            rec.foreign_id,
            rec.run_id,
            hook=engine.state_hook(RunState.PAUSED),
            reason=AUTO_PAUSE_REASON,
        )
        if pause_retry is not None:
            await conn.execute(
                "UPDATE pgflow.records SET retry_at = coalesce(%s, now()) + %s"
                " WHERE run_id = %s AND version = %s",
                (now, pause_retry, paused.run_id, paused.version),
            )
        return paused
    return None


async def _load(
    conn: AsyncConnection[Any], run_ids: list[UUID]
) -> tuple[dict[UUID, RawRecord], set[UUID]]:
    """The records of a batch, and the runs whose current step already ran for their
    current version and chose to wait (``step_done_version = version``)."""
    if not run_ids:
        return {}, set()
    cur = await conn.execute(
        f"SELECT {RECORD_COLUMNS}, step_done_version = version FROM pgflow.records"
        " WHERE run_id = ANY(%s::uuid[])",
        (run_ids,),
    )
    records: dict[UUID, RawRecord] = {}
    done: set[UUID] = set()
    for row in await cur.fetchall():
        rec = RawRecord.from_row(row[:-1])
        records[rec.run_id] = rec
        if row[-1]:
            done.add(rec.run_id)
    return records, done


async def _mark_done(
    conn: AsyncConnection[Any], run_ids: list[UUID], versions: list[int]
) -> set[UUID]:
    """Record that the current step ran for these (run, version) pairs and returned
    None (errors reset too); returns the runs marked — a run missing was moved, or
    marked, by someone else in the meantime (compare-and-set)."""
    cur = await conn.execute(
        "UPDATE pgflow.records r SET step_done_version = r.version, err_count = 0,"
        " last_error = NULL, retry_at = NULL"
        " FROM unnest(%s::uuid[], %s::bigint[]) AS v(run_id, version)"
        " WHERE r.run_id = v.run_id AND r.version = v.version"
        " AND r.step_done_version IS DISTINCT FROM r.version RETURNING r.run_id",
        (run_ids, versions),
    )
    return {row[0] for row in await cur.fetchall()}


@dataclass(frozen=True, slots=True)
class _Move:
    run_id: UUID
    version: int
    status: str
    run_state: str
    object: str | None
    traceparent: str | None
    wrote_tx: bool = False  #: the step wrote through run.tx: the move must not be lost


class StepConsumer(Generic[T, S]):
    """The consumer of one step's shard (see the module doc)."""

    def __init__(self, engine: Engine[T, S], spec: StepSpec[S], shard: int) -> None:
        self.engine = engine
        self.spec = spec
        opts = spec.options
        self.name = f"{engine.name}/{spec.status.name}"
        self.shard = shard
        self.key = CursorKey(self.name, shard, opts.parallel_count)
        self.filter = Filter(
            stream=engine.name,
            types=(spec.status.name,),
            shard=shard,
            shard_count=opts.parallel_count,
        )
        self._wrote = False
        self.consumer: Consumer | None = None
        #: savepoint per event once the step was seen writing through run.tx, or when
        #: on_complete hooks (which may write) exist; else the fast path
        self.isolate = bool(engine.hooks.get("complete:tx"))

    def make_consumer(self, pool: Any) -> Consumer:
        opts = self.spec.options
        self.consumer = Consumer(
            pool,
            self.key,
            self.filter,
            self.handle,
            listener=self.engine.listener,
            batch_size=opts.batch_size,
            poll_interval=opts.polling_frequency.total_seconds(),
            lag=opts.consume_lag if opts.consume_lag.total_seconds() > 0 else None,
            on_batch=self._after_batch,
        )
        return self.consumer

    def _after_batch(self, result: BatchResult) -> None:
        # Called after the batch committed: now a NOTIFY can be seen by others.
        if result.outcome is BatchOutcome.APPLIED and self._wrote:
            self.engine.poke()

    async def handle(self, events: list[Event], conn: AsyncConnection[Any]) -> None:
        started = time.perf_counter()
        self._wrote = False
        records, done = await _load(conn, [e.run_id for e in events if e.run_id is not None])
        moves: list[_Move] = []
        waits: list[_Move] = []
        lag_alert = self.spec.options.lag_alert
        now = datetime.now(UTC)
        for event in events:
            rec = records.get(event.run_id) if event.run_id is not None else None
            if (
                rec is None
                or rec.version != event.version
                or rec.run_state not in PROCESSABLE_STATES
                or rec.status != event.type
                or rec.run_id in done
            ):
                # stale, the run is paused/finished, or this step already ran for this
                # version and chose to wait (the event was read again: a new shard
                # layout, a lost cursor, two deploys at once): nothing to do
                continue
            if lag_alert is not None and now - event.created_at > lag_alert:
                age = (now - event.created_at).total_seconds()
                metrics.lag_alert(self.name, self.shard, age)
                logger.warning(
                    "%s: event %d for %r is %.1fs old (lag_alert %s)",
                    self.key,
                    event.id,
                    event.foreign_id,
                    age,
                    lag_alert,
                )
            if self.isolate:
                new = await self._one(conn, event, rec)
                if new is not None:
                    records[rec.run_id] = new
                else:
                    done.add(rec.run_id)  # waited, failed or stale: not again in this batch
            else:
                await self._fast(conn, event, rec, moves, waits)
                done.add(rec.run_id)
        if waits:
            await self._write_waits(conn, waits)
        if moves:
            await self._write_moves(conn, moves, records)
        metrics.batch(self.name, self.shard, len(events), time.perf_counter() - started)

    async def _fast(
        self,
        conn: AsyncConnection[Any],
        event: Event,
        rec: RawRecord,
        moves: list[_Move],
        waits: list[_Move],
    ) -> None:
        """Run a step that (so far) never touched ``run.tx``: no savepoint is needed, as
        it wrote nothing; its transition joins the batch's single bulk write."""
        engine, spec = self.engine, self.spec
        run = None
        object_json: str | None = None
        try:
            with step_span(
                f"{engine.name} {spec.status.name}",
                event.traceparent,
                self._attributes(rec),
            ) as traceparent:
                run = engine.make_run(rec, conn)
                dest = await maybe_await(spec.fn(run))
                if (
                    dest is not None
                    and not run.changed
                    and (not isinstance(dest, engine.statuses.enum) or dest not in spec.to)
                ):
                    raise InvalidTransition(
                        f"step {spec.name} returned {dest!r}: not one of its declared "
                        f"destinations ({', '.join(s.name for s in spec.to)}) or None"
                    )
                if dest is not None and not run.changed:
                    # inside the try: an object jsonb would refuse is this run's error
                    object_json = engine.objects.dump(run.object)
        except psycopg.OperationalError:
            raise
        except BaseException as exc:
            if not contained(exc):
                raise
            if run is not None and run.tx_used:
                self.isolate = True
                raise RetryBatch(f"{spec.name} wrote through run.tx and failed") from exc
            await self._failed(conn, rec, exc)
            return
        wrote_tx = run.tx_used
        if wrote_tx:
            self.isolate = True  # from now on: a savepoint per event for this step
        metrics.success(self.name, self.shard)
        if run.changed:
            self._wrote = True
            return
        if dest is None:  # waits (for a callback, a timeout...): mark it done
            waits.append(_Move(rec.run_id, rec.version, "", "", None, None, wrote_tx))
            return
        terminal = engine.graph.is_terminal(dest)
        moves.append(
            _Move(
                rec.run_id,
                rec.version,
                dest.name,
                str(RunState.COMPLETED if terminal else RunState.RUNNING),
                object_json,
                traceparent,
                wrote_tx,
            )
        )

    async def _write_moves(
        self, conn: AsyncConnection[Any], moves: list[_Move], records: dict[UUID, RawRecord]
    ) -> None:
        try:
            async with conn.transaction():  # savepoint: a refused row must not end the batch
                moved = await self._bulk_move(conn, moves)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            # One run's row was refused (a value the codec let through but the database
            # does not take, a constraint...). Find it: each move in its own savepoint;
            # the refused run records the error, the others move.
            logger.info("%s: bulk move refused (%s); moving one by one", self.key, exc)
            moved = set()
            for move in moves:
                try:
                    async with conn.transaction():
                        moved |= await self._bulk_move(conn, [move])
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as one:
                    if move.wrote_tx:  # its run.tx writes must go with the move
                        self.isolate = True
                        raise RetryBatch(f"run {move.run_id}: move refused") from one
                    await self._failed(conn, records[move.run_id], one)
        # A record that moved concurrently (an API call won the race) did not match.
        # If its step wrote nothing, there is nothing to undo (a stale event). If it
        # wrote through run.tx, those writes must not commit without the transition:
        # roll the whole batch back and redo it with a savepoint per event.
        lost = [m for m in moves if m.wrote_tx and m.run_id not in moved]
        if lost:
            raise RetryBatch(f"run {lost[0].run_id} moved while its step wrote through run.tx")
        if moved:
            self._wrote = True

    async def _write_waits(self, conn: AsyncConnection[Any], waits: list[_Move]) -> None:
        marked = await _mark_done(conn, [w.run_id for w in waits], [w.version for w in waits])
        # A concurrent consumer (another shard layout) ran the same step for the same
        # version and marked it first: writes through run.tx must not commit twice.
        if any(w.wrote_tx and w.run_id not in marked for w in waits):
            self.isolate = True
            raise RetryBatch("a waiting step's run was handled concurrently")

    async def _bulk_move(self, conn: AsyncConnection[Any], moves: list[_Move]) -> set[UUID]:
        cur = await conn.execute(
            _BULK_MOVE,
            (
                [m.run_id for m in moves],
                [m.version for m in moves],
                [m.status for m in moves],
                [m.run_state for m in moves],
                [m.object for m in moves],
                [m.traceparent for m in moves],
            ),
        )
        return {row[0] for row in await cur.fetchall()}

    def _attributes(self, rec: RawRecord) -> dict[str, Any]:
        return {
            "workflow": self.engine.name,
            "status": self.spec.status.name,
            "foreign_id": rec.foreign_id,
            "run_id": str(rec.run_id),
            "consumer": self.name,
            "shard": self.shard,
        }

    async def _failed(self, conn: AsyncConnection[Any], rec: RawRecord, exc: BaseException) -> None:
        spec = self.spec
        metrics.error(self.name, self.shard)
        logger.warning(
            "workflow %s, status %s: step %s failed for run %s (foreign id %r, attempt %d): %s",
            self.engine.name,
            spec.status.name,
            spec.name,
            rec.run_id,
            rec.foreign_id,
            rec.err_count + 1,
            error_text(exc),
            exc_info=exc,
        )
        paused = await record_error(
            self.engine,
            conn,
            rec,
            exc,
            spec.options,
        )
        if paused is None:
            metrics.retry(self.name, self.shard)
        self._wrote = True

    async def _one(
        self, conn: AsyncConnection[Any], event: Event, rec: RawRecord
    ) -> RawRecord | None:
        engine, spec = self.engine, self.spec
        attributes = self._attributes(rec)
        try:
            with step_span(
                f"{engine.name} {spec.status.name}", event.traceparent, attributes
            ) as traceparent:
                async with conn.transaction():  # savepoint: a failure rolls back only this
                    run = engine.make_run(rec, conn)
                    dest = await maybe_await(spec.fn(run))
                    if run.changed:  # run.pause()/cancel() already wrote the change
                        new: RawRecord | None = run._raw
                    elif dest is None:
                        new = None
                        if not await _mark_done(conn, [rec.run_id], [rec.version]):
                            raise _Stale  # another consumer ran it for this version first
                    else:
                        if not isinstance(dest, engine.statuses.enum):
                            raise InvalidTransition(
                                f"step {spec.name} returned {dest!r}, not a "
                                f"{engine.statuses.enum.__name__} (or None)"
                            )
                        new = await engine.transition(
                            run,
                            dest,
                            change="step",
                            allowed=spec.to,
                            traceparent=traceparent,
                        )
                        if new is None:
                            raise _Stale
            metrics.success(self.name, self.shard)
            if new is not None:
                self._wrote = True
            return new
        except _Stale:
            return None
        except psycopg.OperationalError:
            raise  # the connection is gone: the whole batch is retried
        except BaseException as exc:
            if not contained(exc):
                raise
            await self._failed(conn, rec, exc)
            return None
