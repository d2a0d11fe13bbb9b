"""Workflow records: one row per run, and the only ways it changes.

``pgflow.records`` holds each run's current status, run state and object. Every change
goes through :func:`insert_run` or :func:`write_change`, which update the row AND
append its event (``type`` = status name, ``version`` = the new record version) in the
caller's transaction — so the log and the records never disagree, and a consumer can
tell a stale event (``event.version != record.version``) from a live one.

Changes are compare-and-set on ``version`` instead of ``SELECT ... FOR UPDATE``: a
step consumer reads records without locks (no xid while user code runs: an open xid
holds back VACUUM for the whole cluster) and a concurrent change simply makes its write
miss.

These functions know nothing about a workflow's graph or its Python types; the typed
layer (:class:`Record`, :mod:`pgflow.workflow.run`, :mod:`pgflow.workflow.api`) and the graph-free
admin functions (:mod:`pgflow.workflow.actions`) are built on them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Generic, TypeVar
from uuid import UUID

from psycopg import AsyncConnection

from pgflow.log.events import NewEvent, append

__all__ = [
    "ACTIVE_STATES",
    "REASON_KEY",
    "PROCESSABLE_STATES",
    "RawRecord",
    "Record",
    "RunState",
    "NewRun",
    "insert_run",
    "insert_runs",
    "load_latest",
    "load_many",
    "load_run",
    "write_change",
]

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)


class RunState(enum.StrEnum):
    """Where a run is in its life, independent of the workflow's own statuses."""

    INITIATED = "INITIATED"  #: triggered; no step has moved it yet
    RUNNING = "RUNNING"  #: moved at least once, not finished
    PAUSED = "PAUSED"  #: stopped by a user or after too many errors; resume() continues
    COMPLETED = "COMPLETED"  #: reached a terminal status
    CANCELLED = "CANCELLED"  #: cancelled; never moves again
    REQUESTED_DATA_DELETED = "REQUESTED_DATA_DELETED"  #: erasure asked, not done yet
    DATA_DELETED = "DATA_DELETED"  #: object erased; the audit trail (events) remains

    @property
    def active(self) -> bool:
        """Counts as "in progress" (at most one such run per foreign id)."""
        return self in ACTIVE_STATES

    @property
    def finished(self) -> bool:
        return self not in ACTIVE_STATES


#: States of a run in progress (the ``records_one_active_run`` unique index's set).
ACTIVE_STATES = frozenset({RunState.INITIATED, RunState.RUNNING, RunState.PAUSED})
#: States in which consumers move a run (a paused run is in progress but still).
PROCESSABLE_STATES = frozenset({RunState.INITIATED, RunState.RUNNING})

#: The key of ``records.meta`` holding the reason of the current run state (luno's
#: ``Meta.RunStateReason``); the ``pgflow.runs`` view shows it as ``run_state_reason``.
REASON_KEY = "run_state_reason"

RECORD_COLUMNS = (
    "run_id, workflow, foreign_id, status, run_state, object, version, err_count,"
    " last_error, traceparent, meta, created_at, updated_at, retry_at"
)


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A record row as stored: status as its name, object as parsed JSON."""

    run_id: UUID
    workflow: str
    foreign_id: str
    status: str
    run_state: RunState
    object: Any
    version: int
    err_count: int = 0
    last_error: str | None = None
    traceparent: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    retry_at: datetime | None = None

    @property
    def run_state_reason(self) -> str | None:
        """Why the run entered its current run state (see :func:`write_change`)."""
        reason = self.meta.get(REASON_KEY)
        return None if reason is None else str(reason)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> RawRecord:
        return cls(
            run_id=row[0],
            workflow=row[1],
            foreign_id=row[2],
            status=row[3],
            run_state=RunState(row[4]),
            object=row[5],
            version=row[6],
            err_count=row[7],
            last_error=row[8],
            traceparent=row[9],
            meta=row[10] or {},
            created_at=row[11],
            updated_at=row[12],
            retry_at=row[13],
        )


@dataclass(frozen=True, slots=True)
class Record(Generic[T, S]):
    """A run's record as the workflow's types see it (``status: S``, ``object: T``)."""

    workflow_name: str
    foreign_id: str
    run_id: str
    run_state: RunState
    status: S
    object: T
    created_at: datetime
    updated_at: datetime
    version: int = 1
    err_count: int = 0
    last_error: str | None = None
    traceparent: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run_state_reason(self) -> str | None:
        """Why the run entered its current run state: the ``reason=`` given to
        pause/cancel/resume/delete_data, or the engine's own (an automatic pause says
        "max error retry threshold hit"); None when nobody gave one."""
        reason = self.meta.get(REASON_KEY)
        return None if reason is None else str(reason)

    def evolve(self, **changes: Any) -> Record[T, S]:
        return replace(self, **changes)


async def load_latest(
    conn: AsyncConnection[Any], workflow: str, foreign_id: str
) -> RawRecord | None:
    """The newest run of ``foreign_id`` in ``workflow`` (None when it never ran)."""
    cur = await conn.execute(
        f"SELECT {RECORD_COLUMNS} FROM pgflow.records WHERE workflow = %s AND foreign_id = %s"
        " ORDER BY created_at DESC, version DESC LIMIT 1",
        (workflow, foreign_id),
    )
    row = await cur.fetchone()
    return RawRecord.from_row(row) if row else None


async def load_run(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    run_id: UUID | str | None = None,
    *,
    lock: bool = False,
) -> RawRecord | None:
    """One run (the newest when ``run_id`` is None); ``lock`` takes the row lock.

    API calls lock (``FOR UPDATE``) so two of them on one run apply one after the
    other; their transactions are short, so holding an xid there is harmless.
    """
    suffix = " FOR UPDATE" if lock else ""
    if run_id is None:
        cur = await conn.execute(
            f"SELECT {RECORD_COLUMNS} FROM pgflow.records WHERE workflow = %s"
            " AND foreign_id = %s ORDER BY created_at DESC, version DESC LIMIT 1" + suffix,
            (workflow, foreign_id),
        )
    else:
        cur = await conn.execute(
            f"SELECT {RECORD_COLUMNS} FROM pgflow.records WHERE run_id = %s"
            " AND workflow = %s AND foreign_id = %s" + suffix,
            (UUID(str(run_id)), workflow, foreign_id),
        )
    row = await cur.fetchone()
    return RawRecord.from_row(row) if row else None


async def load_many(conn: AsyncConnection[Any], run_ids: Sequence[UUID]) -> dict[UUID, RawRecord]:
    """Records by run id, in one statement, without locks (see the module doc)."""
    if not run_ids:
        return {}
    cur = await conn.execute(
        f"SELECT {RECORD_COLUMNS} FROM pgflow.records WHERE run_id = ANY(%s::uuid[])",
        (list(run_ids),),
    )
    return {r.run_id: r for r in map(RawRecord.from_row, await cur.fetchall())}


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


@dataclass(frozen=True, slots=True)
class NewRun:
    """One run for :func:`insert_runs` (the arguments of :func:`insert_run`)."""

    foreign_id: str
    run_id: UUID
    status: str
    object_json: str | None
    traceparent: str | None = None
    run_state: RunState = RunState.INITIATED
    headers: Mapping[str, str] | None = None


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


class _Unset(enum.Enum):
    UNSET = 0


UNSET = _Unset.UNSET


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
