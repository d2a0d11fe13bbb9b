"""Operator actions on runs that need no Builder: pause, resume, cancel, retry, erase.

Each function takes a connection, a workflow name and a foreign id (plus optionally a
run id; the newest run otherwise), applies one run-state change in its own transaction
(a savepoint when ``conn`` is already inside one) and returns the new raw record. They
back ``pgflow retry|pause|resume|cancel`` and the matching :class:`pgflow.Workflow`
methods, which additionally fire the workflow's ``on_pause``/``on_cancel`` hooks (the
CLI has no Python hooks to fire; pass ``hook=`` to run your own).

Every change is a record update plus its event (``write_change``); a resume or retry
re-emits the run's current status event, which is what makes its step run again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection

from .errors import InvalidTransition, NotFound
from .records import (
    PROCESSABLE_STATES,
    UNSET,
    RawRecord,
    RunState,
    _Unset,
    load_run,
    write_change,
)

__all__ = [
    "cancel",
    "erase_data",
    "pause",
    "request_data_deletion",
    "resume",
    "retry",
    "set_run_state",
]

Hook = Callable[[RawRecord, AsyncConnection[Any]], Awaitable[None]]

#: run state -> the states it may be entered from
_ALLOWED_FROM: dict[RunState, frozenset[RunState]] = {
    RunState.PAUSED: PROCESSABLE_STATES,
    RunState.CANCELLED: frozenset({RunState.INITIATED, RunState.RUNNING, RunState.PAUSED}),
    RunState.RUNNING: frozenset({RunState.PAUSED}),
    RunState.REQUESTED_DATA_DELETED: frozenset(
        {
            RunState.INITIATED,
            RunState.RUNNING,
            RunState.PAUSED,
            RunState.COMPLETED,
            RunState.CANCELLED,
        }
    ),
}
#: run states ``retry`` accepts (a paused run is resumed by it)
_RETRYABLE = PROCESSABLE_STATES | {RunState.PAUSED}
_VERB = {
    RunState.PAUSED: "pause",
    RunState.CANCELLED: "cancel",
    RunState.RUNNING: "resume",
    RunState.REQUESTED_DATA_DELETED: "delete_data",
}


async def _locked(
    conn: AsyncConnection[Any], workflow: str, foreign_id: str, run_id: UUID | str | None
) -> RawRecord:
    rec = await load_run(conn, workflow, foreign_id, run_id, lock=True)
    if rec is None:
        which = f"run {run_id}" if run_id else "any run"
        raise NotFound(f"workflow {workflow!r}: no {which} for foreign id {foreign_id!r}")
    return rec


async def _locked_for(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    run_id: UUID | str | None,
    verb: str,
    allowed: Collection[RunState],
) -> RawRecord:
    """The locked run, or :class:`InvalidTransition` when its run state is not one of
    ``allowed`` (the caller's transaction then changes nothing)."""
    rec = await _locked(conn, workflow, foreign_id, run_id)
    if rec.run_state not in allowed:
        raise InvalidTransition(
            f"workflow {workflow!r}: cannot {verb} run {rec.run_id} of {foreign_id!r}: "
            f"it is {rec.run_state}"
        )
    return rec


async def set_run_state(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    run_id: UUID | str | None,
    state: RunState,
    *,
    object_json: str | _Unset | None = UNSET,
    hook: Hook | None = None,
    reason: str | None = None,
) -> RawRecord:
    """Move a run to ``state`` if its current run state allows it, else
    :class:`InvalidTransition` (and nothing changes). ``reason`` (why a person paused or
    cancelled it) is stored in the change event's headers, shown by ``pgflow.run_history``
    and the console."""
    allowed = _ALLOWED_FROM.get(state)
    if allowed is None:
        raise InvalidTransition(f"run state {state} cannot be set directly")
    async with conn.transaction():
        rec = await _locked_for(conn, workflow, foreign_id, run_id, _VERB[state], allowed)
        new = await write_change(
            conn,
            rec,
            change=_VERB[state],
            run_state=state,
            object_json=object_json,
            reset_errors=state is RunState.RUNNING,
            headers={"reason": reason} if reason else None,
        )
        assert new is not None  # the row is locked: the compare-and-set cannot miss
        if hook is not None:
            await hook(new, conn)
        return new


async def pause(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    run_id: UUID | str | None = None,
    *,
    hook: Hook | None = None,
    reason: str | None = None,
) -> RawRecord:
    """Stop a run in progress where it is; :func:`resume` continues it."""
    return await set_run_state(
        conn, workflow, foreign_id, run_id, RunState.PAUSED, hook=hook, reason=reason
    )


async def resume(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    run_id: UUID | str | None = None,
    *,
    hook: Hook | None = None,
) -> RawRecord:
    """Continue a paused run: its error count is reset and its current step runs again."""
    return await set_run_state(conn, workflow, foreign_id, run_id, RunState.RUNNING, hook=hook)


async def cancel(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    run_id: UUID | str | None = None,
    *,
    hook: Hook | None = None,
    reason: str | None = None,
) -> RawRecord:
    """End a run for good (it frees the foreign id for a new ``trigger``)."""
    return await set_run_state(
        conn, workflow, foreign_id, run_id, RunState.CANCELLED, hook=hook, reason=reason
    )


async def retry(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    run_id: UUID | str | None = None,
) -> RawRecord:
    """Run the current step again now: reset errors, unpause, re-emit its event."""
    async with conn.transaction():
        rec = await _locked_for(conn, workflow, foreign_id, run_id, "retry", _RETRYABLE)
        state = RunState.RUNNING if rec.run_state is RunState.PAUSED else rec.run_state
        new = await write_change(conn, rec, change="retry", run_state=state, reset_errors=True)
        assert new is not None
        return new


async def request_data_deletion(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    run_id: UUID | str | None = None,
) -> RawRecord:
    """First half of ``delete_data``: mark the run REQUESTED_DATA_DELETED."""
    return await set_run_state(conn, workflow, foreign_id, run_id, RunState.REQUESTED_DATA_DELETED)


async def erase_data(
    conn: AsyncConnection[Any], workflow: str, foreign_id: str, run_id: UUID | str
) -> RawRecord | None:
    """Second half: erase the object and last error, mark DATA_DELETED (events stay as
    the audit trail). Returns None when the run was not waiting for erasure."""
    async with conn.transaction():
        rec = await _locked(conn, workflow, foreign_id, run_id)
        if rec.run_state is not RunState.REQUESTED_DATA_DELETED:
            return None
        return await write_change(
            conn,
            rec,
            change="data_deleted",
            run_state=RunState.DATA_DELETED,
            object_json=None,
            reset_errors=True,
        )
