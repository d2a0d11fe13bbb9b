"""Operator actions on runs that need no Builder: pause, resume, cancel, retry, erase.

Each function takes a connection, a workflow name and a foreign id (plus optionally a
run id; the newest run otherwise), applies one run-state change in its own transaction
(a savepoint when ``conn`` is already inside one) and returns the new raw record. They
back ``pgflow retry|pause|resume|cancel`` and the matching :class:`pgflow.Workflow`
methods, which additionally fire the workflow's ``on_pause``/``on_cancel`` hooks (the
CLI has no Python hooks to fire; pass ``hook=`` to run your own).

Every change is a record update plus its event (``write_change``); a resume or retry
re-emits the run's current status event, which is what makes its step run again.
Each takes an optional ``reason``: stored as the run state's reason
(``Record.run_state_reason``, the ``run_state_reason`` column of ``pgflow.runs``) and
in the event's headers, so "who paused this and why" is answered by the record.

Data deletion follows luno: only a finished run (completed or cancelled) can have its
data deleted, and deletion can be repeated (a DATA_DELETED run may be deleted again,
e.g. after a scrub function learned about a new personal field). Cancel a run in
progress first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection

from pgflow.errors import InvalidTransition, NotFound
from pgflow.workflow.records import (
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
#: ``scrub(object_json) -> object_json``: what erasure leaves of a run's stored object
#: (None: nothing). A workflow's ``custom_delete`` is turned into one (see the engine).
Scrub = Callable[[Any], Awaitable[str | None]]
#: ``erase_copies(conn, foreign_id)``: erase the run's data pgflow holds elsewhere
#: (e.g. change-log rows), in the erasure's transaction.
EraseCopies = Callable[[AsyncConnection[Any], str], Awaitable[None]]

#: run state -> the states it may be entered from
_ALLOWED_FROM: dict[RunState, frozenset[RunState]] = {
    RunState.PAUSED: PROCESSABLE_STATES,
    RunState.CANCELLED: frozenset({RunState.INITIATED, RunState.RUNNING, RunState.PAUSED}),
    RunState.RUNNING: frozenset({RunState.PAUSED}),
    RunState.REQUESTED_DATA_DELETED: frozenset(
        {RunState.COMPLETED, RunState.CANCELLED, RunState.DATA_DELETED}
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
    :class:`InvalidTransition` (and nothing changes). ``reason`` becomes the run
    state's reason (None clears the previous one)."""
    allowed = _ALLOWED_FROM.get(state)
    if allowed is None:
        raise InvalidTransition(f"run state {state} cannot be set directly")
    _check_reason(reason)
    async with conn.transaction():
        rec = await _locked_for(conn, workflow, foreign_id, run_id, _VERB[state], allowed)
        new = await write_change(
            conn,
            rec,
            change=_VERB[state],
            run_state=state,
            object_json=object_json,
            reset_errors=state is RunState.RUNNING,
            # a pause by hand is not resumed by pause_retry (only automatic ones are)
            clear_retry=state is not RunState.RUNNING,
            reason=reason,
        )
        assert new is not None  # the row is locked: the compare-and-set cannot miss
        if hook is not None:
            await hook(new, conn)
        return new


def _check_reason(reason: str | None) -> None:
    if reason is not None and not isinstance(reason, str):
        raise TypeError(f"reason must be a string or None, got {type(reason).__name__}")


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
    reason: str | None = None,
) -> RawRecord:
    """Continue a paused run: its error count is reset and its current step runs again."""
    return await set_run_state(
        conn, workflow, foreign_id, run_id, RunState.RUNNING, hook=hook, reason=reason
    )


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
    *,
    reason: str | None = None,
) -> RawRecord:
    """Run the current step again now: reset errors, unpause, re-emit its event."""
    _check_reason(reason)
    async with conn.transaction():
        rec = await _locked_for(conn, workflow, foreign_id, run_id, "retry", _RETRYABLE)
        state = RunState.RUNNING if rec.run_state is RunState.PAUSED else rec.run_state
        new = await write_change(
            conn, rec, change="retry", run_state=state, reset_errors=True, reason=reason
        )
        assert new is not None
        return new


async def request_data_deletion(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    run_id: UUID | str | None = None,
    *,
    reason: str | None = None,
) -> RawRecord:
    """First half of ``delete_data``: mark a finished run REQUESTED_DATA_DELETED (a
    worker's timer poller, or the caller, then erases it: :func:`erase_data`)."""
    return await set_run_state(
        conn, workflow, foreign_id, run_id, RunState.REQUESTED_DATA_DELETED, reason=reason
    )


async def erase_data(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    run_id: UUID | str,
    *,
    scrub: Scrub | None = None,
    erase_copies: EraseCopies | None = None,
) -> RawRecord | None:
    """Second half: replace the object by what ``scrub`` keeps of it (default:
    nothing, NULL), erase copies of the run's data that pgflow keeps elsewhere
    (``erase_copies``: the change log rows its connectors delivered), clear the last
    error, mark DATA_DELETED (events stay as the audit trail; the deletion's reason is
    kept). Returns None when the run was not waiting for erasure. A failing ``scrub``
    raises and changes nothing."""
    async with conn.transaction():
        rec = await _locked(conn, workflow, foreign_id, run_id)
        if rec.run_state is not RunState.REQUESTED_DATA_DELETED:
            return None
        kept = None if scrub is None else await scrub(rec.object)
        if erase_copies is not None:
            await erase_copies(conn, foreign_id)
        return await write_change(
            conn,
            rec,
            change="data_deleted",
            run_state=RunState.DATA_DELETED,
            object_json=kept,
            reset_errors=True,
            reason=rec.run_state_reason,
        )
