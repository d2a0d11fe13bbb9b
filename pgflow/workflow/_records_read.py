"""Workflow records as they are read: the types and the SELECTs of ``pgflow.records``.

The run state, the row as stored (:class:`RawRecord`), the typed view
(:class:`Record`) and the loads, all without row locks unless asked. Every statement
that *writes* the table is in :mod:`pgflow.workflow.records` (which re-exports all of
this, so callers import from there); the two were split so each stays readable in
one sitting.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Generic, TypeVar
from uuid import UUID

from psycopg import AsyncConnection

__all__ = [
    "ACTIVE_STATES",
    "PROCESSABLE_STATES",
    "REASON_KEY",
    "RECORD_COLUMNS",
    "UNSET",
    "RawRecord",
    "Record",
    "NewRun",
    "RunState",
    "StepMove",
    "load_latest",
    "load_many",
    "load_run",
    "load_step_batch",
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


class _Unset(enum.Enum):
    UNSET = 0


UNSET = _Unset.UNSET


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


@dataclass(frozen=True, slots=True)
class StepMove:
    """One run's transition for :func:`move_steps` (``status``/``run_state`` by name)."""

    run_id: UUID
    version: int
    status: str
    run_state: str
    object: str | None
    traceparent: str | None


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


async def load_step_batch(
    conn: AsyncConnection[Any], run_ids: list[UUID]
) -> tuple[dict[UUID, RawRecord], set[UUID]]:
    """The records of a step batch (no locks, see the module doc), and the runs whose
    current step already ran for their current version and chose to wait
    (``step_done_version = version``, set by :func:`mark_steps_done`)."""
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
