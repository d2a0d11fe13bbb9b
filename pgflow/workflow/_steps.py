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
never blocks its shard. The timer poller (:mod:`pgflow.workflow._retries`) re-emits the run's
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

import enum
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from uuid import UUID

import psycopg
from psycopg import AsyncConnection

from pgflow.errors import InvalidTransition
from pgflow.log.cursors import BatchOutcome, BatchResult, Consumer, CursorKey, RetryBatchNow
from pgflow.log.events import Event
from pgflow.observability import metrics, step_span
from pgflow.workflow._engine import Engine, maybe_await
from pgflow.workflow._failures import contained, log_failure, record_error
from pgflow.workflow.graph import StepSpec
from pgflow.workflow.records import (
    PROCESSABLE_STATES,
    RawRecord,
    RunState,
    StepMove,
    load_step_batch,
    mark_steps_done,
    move_steps,
)

__all__ = ["RetryBatch", "StepConsumer"]

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


@dataclass(frozen=True, slots=True)
class _Move(StepMove):
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
        self.filter = engine.status_shard(spec.status, shard, opts.parallel_count)
        self._wrote = False
        self.consumer: Consumer | None = None
        #: savepoint per event once the step was seen writing through run.tx, or when
        #: on_complete hooks (which may write) exist; else the fast path
        self.isolate = bool(engine.hooks.get("complete:tx"))

    def make_consumer(self, pool: Any) -> Consumer:
        opts = self.spec.options
        lag = opts.consume_lag if opts.consume_lag.total_seconds() > 0 else None
        self.consumer = self.engine.consumer(pool, self, opts, lag=lag, on_batch=self._after_batch)
        return self.consumer

    def _after_batch(self, result: BatchResult) -> None:
        # Called after the batch committed: now a NOTIFY can be seen by others.
        if result.outcome is BatchOutcome.APPLIED and self._wrote:
            self.engine.poke()

    async def handle(self, events: list[Event], conn: AsyncConnection[Any]) -> None:
        started = time.perf_counter()
        self._wrote = False
        records, done = await load_step_batch(
            conn, [e.run_id for e in events if e.run_id is not None]
        )
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
                        f"destinations ({', '.join(s.name for s in spec.to)}) or None",
                        workflow=engine.name,
                        foreign_id=rec.foreign_id,
                        run_id=rec.run_id,
                        from_status=run.status,
                    )
                if dest is not None and not run.changed:
                    # inside the try: an object jsonb would refuse is this run's error
                    object_json = engine.objects.dump(run.object)
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
                moved = await move_steps(conn, moves)
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
                        moved |= await move_steps(conn, [move])
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
        marked = await mark_steps_done(conn, [w.run_id for w in waits], [w.version for w in waits])
        # A concurrent consumer (another shard layout) ran the same step for the same
        # version and marked it first: writes through run.tx must not commit twice.
        if any(w.wrote_tx and w.run_id not in marked for w in waits):
            self.isolate = True
            raise RetryBatch("a waiting step's run was handled concurrently")

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
        what = f"workflow {self.engine.name}, status {spec.status.name}: step {spec.name}"
        log_failure(logger, what, rec, exc)
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
                        if not await mark_steps_done(conn, [rec.run_id], [rec.version]):
                            raise _Stale  # another consumer ran it for this version first
                    else:
                        if not isinstance(dest, engine.statuses.enum):
                            raise InvalidTransition(
                                f"step {spec.name} returned {dest!r}, not a "
                                f"{engine.statuses.enum.__name__} (or None)",
                                workflow=engine.name,
                                foreign_id=rec.foreign_id,
                                run_id=rec.run_id,
                                from_status=run.status,
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
        except BaseException as exc:
            if not contained(exc):
                raise
            await self._failed(conn, rec, exc)
            return None
