"""Workflow records: one row per run, and every statement that changes it.

``pgflow.records`` holds each run's current status, run state and object. This module
owns its SQL: every INSERT and UPDATE of the table is a function here, named after the
change it makes, so a reader sees in one place every way a record can move and which
columns each touches (the schema's invariants — one active run per foreign id, a
version bump per event — are checked against this list, not against grep). Every
*move* goes through :func:`insert_run`, :func:`insert_runs`, :func:`write_change` or
:func:`move_steps`, which update the row AND append its event (``type`` = status name,
``version`` = the new record version) in the caller's transaction — so the log and the
records never disagree, and a consumer can tell a stale event (``event.version !=
record.version``) from a live one. The other writes (:func:`count_error`,
:func:`set_pause_retry`, :func:`mark_steps_done`, :func:`claim_due_retries`) keep the
version: they annotate a run without moving it.

Changes are compare-and-set on ``version`` instead of ``SELECT ... FOR UPDATE``: a
step consumer reads records without locks (no xid while user code runs: an open xid
holds back VACUUM for the whole cluster) and a concurrent change simply makes its write
miss.

The statements of the step consumer's hot path (:data:`_BULK_MOVE`, :func:`count_error`,
:func:`mark_steps_done`) are the ones the benches measure (``bench/workflow.py`` runs
:data:`_BULK_MOVE` by hand): change them only with a bench run.

Stability: this module is *advanced*. Application code changes runs through the
workflow API (``wf.trigger``, ``wf.update_status``, ``pgflow.workflow.actions``); the
functions here are exported for tools that must write a record inside a transaction of
their own, and may change between minor versions. :class:`Record` and
:class:`RunState` are the stable types (``pgflow.Record``, ``pgflow.RunState``).

These functions know nothing about a workflow's graph or its Python types; the typed
layer (:mod:`pgflow.workflow.run`, :mod:`pgflow.workflow.api`) and the graph-free admin
functions (:mod:`pgflow.workflow.actions`) are built on them. The record types and the
reads live in :mod:`pgflow.workflow._records_read`, re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection

from pgflow.log.events import NewEvent, append
from pgflow.workflow import _records_read
from pgflow.workflow._records_read import *  # noqa: F403  (re-exported: see the module doc)
from pgflow.workflow._records_read import (
    REASON_KEY,
    RECORD_COLUMNS,
    UNSET,
    NewRun,
    RawRecord,
    RunState,
    StepMove,
    _Unset,
)

__all__ = [
    *_records_read.__all__,
    "_Unset",  # the type of UNSET, for signatures
    "claim_due_retries",
    "count_error",
    "insert_run",
    "insert_runs",
    "mark_steps_done",
    "move_steps",
    "set_pause_retry",
    "write_change",
]


# One statement inserts the record and its first event: one round trip, and with an
# autocommit connection one commit, for the hottest client call.
_INSERT_RUN = f"""
WITH r AS (
    INSERT INTO pgflow.records
        (run_id, workflow, foreign_id, status, run_state, object, version, traceparent)
    VALUES (%(run_id)s, %(workflow)s, %(foreign_id)s, %(status)s, %(run_state)s,
            %(object)s::jsonb, 1, %(traceparent)s)
    RETURNING {RECORD_COLUMNS}
), e AS (
    INSERT INTO pgflow.events (stream, type, foreign_id, run_id, version, headers, traceparent)
    SELECT r.workflow, r.status, r.foreign_id, r.run_id, r.version, %(headers)s::jsonb,
           r.traceparent
    FROM r
)
SELECT {RECORD_COLUMNS} FROM r
"""


async def insert_run(
    conn: AsyncConnection[Any],
    *,
    workflow: str,
    foreign_id: str,
    run_id: UUID,
    status: str,
    object_json: str | None,
    traceparent: str | None = None,
    run_state: RunState = RunState.INITIATED,
    headers: Mapping[str, str] | None = None,
) -> RawRecord:
    """Create a run (version 1) and append its first event, in the caller's transaction.

    Raises ``psycopg.errors.UniqueViolation`` when the foreign id already has an active
    run (index ``records_one_active_run``) or ``run_id`` exists; callers translate it.
    """
    hdrs = {"run_state": str(run_state), "change": "trigger", **(headers or {})}
    cur = await conn.execute(
        _INSERT_RUN,
        {
            "run_id": run_id,
            "workflow": workflow,
            "foreign_id": foreign_id,
            "status": status,
            "run_state": str(run_state),
            "object": object_json,
            "traceparent": traceparent,
            "headers": json.dumps(hdrs),
        },
    )
    row = await cur.fetchone()
    assert row is not None
    return RawRecord.from_row(row)


# Many runs in one statement: records first (skipping any that hit a unique index:
# an active run of the foreign id, or an existing run id), then one first event per
# record actually inserted, in input order. Returns the inserted run ids. The arrays
# go in binary (%b): text arrays in text format cost a regex escape per element.
_INSERT_RUNS = """
WITH input AS (
    SELECT * FROM unnest(%(run_ids)b::uuid[], %(foreign_ids)b::text[], %(statuses)b::text[],
                         %(run_states)b::text[], %(objects)b::text[]::jsonb[],
                         %(traceparents)b::text[], %(headers)b::text[]::jsonb[])
        WITH ORDINALITY AS i (run_id, foreign_id, status, run_state, object, traceparent,
                              headers, ord)
), r AS (
    INSERT INTO pgflow.records
        (run_id, workflow, foreign_id, status, run_state, object, version, traceparent)
    SELECT run_id, %(workflow)s, foreign_id, status, run_state, object, 1, traceparent
    FROM input ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING run_id, workflow, foreign_id, status, version, traceparent
), e AS (
    INSERT INTO pgflow.events (stream, type, foreign_id, run_id, version, headers, traceparent)
    SELECT r.workflow, r.status, r.foreign_id, r.run_id, r.version, i.headers, r.traceparent
    FROM r JOIN input i ON i.run_id = r.run_id
    ORDER BY i.ord
)
SELECT run_id FROM r
"""


async def insert_runs(
    conn: AsyncConnection[Any], workflow: str, runs: Sequence[NewRun]
) -> set[UUID]:
    """Create many runs (version 1) with their first events in ONE statement, in the
    caller's transaction; returns the run ids inserted.

    Unlike :func:`insert_run` a conflict does not raise: a run whose foreign id already
    has an active run (or whose run id exists) is skipped and missing from the result,
    and nothing of it is written. The caller decides what a skipped run means (the
    connector runner's optimistic batch falls back to per-event triggers).
    """
    if not runs:
        return set()
    cur = await conn.execute(
        _INSERT_RUNS,
        {
            "workflow": workflow,
            "run_ids": [r.run_id for r in runs],
            "foreign_ids": [r.foreign_id for r in runs],
            "statuses": [r.status for r in runs],
            "run_states": [str(r.run_state) for r in runs],
            "objects": [r.object_json for r in runs],
            "traceparents": [r.traceparent for r in runs],
            "headers": [
                json.dumps(
                    {"run_state": str(r.run_state), "change": "trigger", **(r.headers or {})}
                )
                for r in runs
            ],
        },
    )
    return {row[0] for row in await cur.fetchall()}


async def write_change(
    conn: AsyncConnection[Any],
    rec: RawRecord,
    *,
    change: str,
    status: str | None = None,
    run_state: RunState | None = None,
    object_json: str | _Unset | None = UNSET,
    reset_errors: bool = False,
    traceparent: str | None = None,
    headers: Mapping[str, str] | None = None,
    reason: str | _Unset | None = UNSET,
    clear_retry: bool = False,
) -> RawRecord | None:
    """Move ``rec`` to a new version and append the matching event (same transaction).

    Compare-and-set on ``rec.version``: returns None, writing nothing, when the record
    changed since ``rec`` was read. ``change`` names what happened (trigger, step,
    pause, ...) and is stored in the event's headers together with the run state.

    ``reason`` is stored as the run state's reason (``meta.run_state_reason``, and the
    event's ``reason`` header); None clears it. Left unset, a change of run state
    clears it too: a reason always explains the run state it was given with.
    """
    sets = ["version = version + 1", "updated_at = now()"]
    params: list[Any] = []
    if status is not None:
        sets.append("status = %s")
        params.append(status)
    if run_state is not None:
        sets.append("run_state = %s")
        params.append(str(run_state))
    if object_json is not UNSET:
        sets.append("object = %s::jsonb")
        params.append(object_json)
    if reset_errors:
        sets.append("err_count = 0, last_error = NULL, retry_at = NULL")
    if clear_retry:
        sets.append("retry_at = NULL")
    if traceparent is not None:
        sets.append("traceparent = %s")
        params.append(traceparent)
    if isinstance(reason, str):
        sets.append("meta = meta || jsonb_build_object(%s::text, %s::text)")
        params += [REASON_KEY, reason]
    elif reason is None or (run_state is not None and run_state is not rec.run_state):
        sets.append("meta = meta - %s::text")
        params.append(REASON_KEY)
    params += [rec.run_id, rec.version]
    cur = await conn.execute(
        f"UPDATE pgflow.records SET {', '.join(sets)} WHERE run_id = %s AND version = %s"
        f" RETURNING {RECORD_COLUMNS}",
        params,
    )
    row = await cur.fetchone()
    if row is None:
        return None
    new = RawRecord.from_row(row)
    await append(
        conn,
        [
            NewEvent(
                stream=new.workflow,
                type=new.status,
                foreign_id=new.foreign_id,
                run_id=new.run_id,
                version=new.version,
                headers={
                    "run_state": str(new.run_state),
                    "change": change,
                    **({"reason": reason} if isinstance(reason, str) else {}),
                    **(headers or {}),
                },
                traceparent=traceparent or new.traceparent,
            )
        ],
    )
    return new


# -- the step consumer's writes (pgflow.workflow._steps) ------------------------------

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


async def move_steps(conn: AsyncConnection[Any], moves: Sequence[StepMove]) -> set[UUID]:
    """Move many runs and append their ``change=step`` events in ONE statement; returns
    the runs moved (compare-and-set per run: one that moved meanwhile is missing).

    :func:`write_change` for a whole batch: the step consumer's fast path (steps that
    wrote nothing through ``run.tx``) would otherwise pay a round trip per run. Errors
    are reset as :func:`write_change` ``reset_errors=True`` does, and the run-state
    reason is dropped when the run state changes."""
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


async def mark_steps_done(
    conn: AsyncConnection[Any], run_ids: list[UUID], versions: list[int]
) -> set[UUID]:
    """Record that the current step ran for these (run, version) pairs and returned
    None — it waits for a callback or a timeout — so a re-read of the same event (a new
    shard layout, a lost cursor) does not run it again; errors reset too. Returns the
    runs marked: one missing was moved, or marked, by someone else meanwhile
    (compare-and-set; the version is kept, as no event is appended)."""
    cur = await conn.execute(
        "UPDATE pgflow.records r SET step_done_version = r.version, err_count = 0,"
        " last_error = NULL, retry_at = NULL"
        " FROM unnest(%s::uuid[], %s::bigint[]) AS v(run_id, version)"
        " WHERE r.run_id = v.run_id AND r.version = v.version"
        " AND r.step_done_version IS DISTINCT FROM r.version RETURNING r.run_id",
        (run_ids, versions),
    )
    return {row[0] for row in await cur.fetchall()}


# -- failures and retries (pgflow.workflow._failures, pgflow.workflow._retries) ---------


async def count_error(
    conn: AsyncConnection[Any],
    rec: RawRecord,
    error: str,
    *,
    pausing: bool,
    retry_step: bool,
    now: datetime | None,
    err_backoff_s: float,
) -> int | None:
    """Count a failed attempt on ``rec`` (``err_count``, ``last_error``) and set when
    its step is retried: ``retry_at = now + err_backoff * 2**(n-1)`` (capped at 10
    minutes); none when ``pausing`` (a pause by hand must not be resumed), kept as it
    is when not ``retry_step`` (timers schedule their own retry). ``now`` is the
    workflow clock's (None: the database's). Returns the new error count, or None when
    the record moved (compare-and-set on the version, which is NOT bumped: the retry
    event carries the same version, so it is still current when it arrives)."""
    cur = await conn.execute(
        "UPDATE pgflow.records SET err_count = err_count + 1, last_error = %s,"
        " retry_at = CASE WHEN %s THEN NULL WHEN NOT %s THEN retry_at"
        "   ELSE coalesce(%s, now())"
        "        + make_interval(secs => least(%s * 2 ^ least(err_count, 30), 600))"
        " END,"
        " updated_at = now()"
        " WHERE run_id = %s AND version = %s RETURNING err_count",
        (error, pausing, retry_step, now, err_backoff_s, rec.run_id, rec.version),
    )
    row = await cur.fetchone()
    return None if row is None else int(row[0])


async def set_pause_retry(
    conn: AsyncConnection[Any], rec: RawRecord, now: datetime | None, delay: timedelta
) -> None:
    """Have the timer poller resume the automatically paused ``rec`` after ``delay``
    (``retry_at`` of a PAUSED run; a pause by hand clears it, so only automatic pauses
    come back by themselves)."""
    await conn.execute(
        "UPDATE pgflow.records SET retry_at = coalesce(%s, now()) + %s"
        " WHERE run_id = %s AND version = %s",
        (now, delay, rec.run_id, rec.version),
    )


async def claim_due_retries(
    conn: AsyncConnection[Any], workflow: str, now: datetime | None, limit: int
) -> int:
    """Re-emit the current event of up to ``limit`` runs whose failed step is due
    again (``retry_at`` passed), clearing ``retry_at`` in the same statement: a step
    retry is an ordinary event (see :mod:`pgflow.workflow._steps` for why). Rows are
    taken ``FOR UPDATE SKIP LOCKED``, so worker processes share the work; the caller's
    transaction makes the claim and the events one. Returns how many."""
    cur = await conn.execute(
        "UPDATE pgflow.records r SET retry_at = NULL WHERE r.run_id IN ("
        " SELECT run_id FROM pgflow.records WHERE workflow = %s"
        " AND retry_at <= coalesce(%s, now()) AND run_state IN ('INITIATED', 'RUNNING')"
        " ORDER BY retry_at LIMIT %s FOR UPDATE SKIP LOCKED)"
        " RETURNING r.run_id, r.workflow, r.foreign_id, r.status, r.version,"
        " r.traceparent, r.err_count, r.run_state",
        (workflow, now, limit),
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
    return len(rows)
