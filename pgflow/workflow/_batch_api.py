"""Optimistic connector batches: many ``trigger`` calls, one statement.

The connector runner's per-event path costs about five round trips per event (its
savepoint, ``trigger``'s savepoint, the record+event insert, the releases). When a
transactional batch is ordinary — every function succeeds and only triggers new runs
(and reads) — those savepoints are never used. So the runner first tries the batch
*optimistically*: it runs every function with an API bound to a :class:`Batch`, whose
``trigger`` only validates and buffers the run (returning its id at once), and writes
all buffered runs with their first events in one multi-row statement
(:func:`pgflow.workflow.records.insert_runs`) at the end of the batch. The whole attempt runs
in one savepoint of the batch transaction, before any ack.

When one event's function fails — it raises (including :class:`pgflow.
WorkflowInProgress` it did not catch), or it needs the per-event path (it used
``api.conn``, or an API call that writes something other than a new run:
``update_status``, ``callback``, ``pause``, ..., or a trigger straight into a terminal
status) — the attempt's savepoint is rolled back and the runs buffered by the events
*before* it are written again (:attr:`Batch.added`: in this mode a function that
returned has no other effect), so their functions do not run twice. A raising event is
then handled as on the per-event path (that was its attempt: retried later or
dead-lettered alone); one that needs the per-event path goes there with the rest of
the batch, in the same transaction.

Only when a buffered run hits a unique index when the batch is written (the foreign id
already had a run in progress, or the run id existed: a redelivery) does the whole
attempt *fall back*: nothing of it remains and the batch's functions run again per
event, with the exact per-event semantics (``WorkflowInProgress`` raised where it
happens).

Semantics kept: reads (``exists``, ``latest``, ``get``, ``wait_for``) first write what
is buffered, so a function sees the runs triggered earlier in the batch
(read-your-writes); two triggers of one foreign id in a batch behave as they would one
after the other (the second raises ``WorkflowInProgress``, or returns the run id when
it is the same explicit ``run_id``); effects and the source cursor still commit in one
transaction. A fallback (or a function that needs the per-event path) runs functions a
second time; :class:`Optimism` keeps that price small: after one the runner skips the
optimistic attempt for the next 1, 2, 4 ... 64 batches.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import AsyncConnection

from pgflow.errors import WorkflowInProgress
from pgflow.workflow.records import NewRun, insert_runs

__all__ = ["Batch", "NeedsPerEventPath", "Optimism", "in_progress"]


def in_progress(workflow: str, foreign_id: str) -> WorkflowInProgress:
    """The error of a trigger whose foreign id has a run in progress: one wording for
    the buffered trigger (:meth:`Batch.add`) and the written one (``API.trigger``)."""
    return WorkflowInProgress(
        f"workflow {workflow!r}: foreign id {foreign_id!r} already has a "
        "run in progress (wait for it, or cancel it first)"
    )


class NeedsPerEventPath(Exception):
    """The optimistic attempt cannot continue; the runner falls back (see module doc)."""

    control_flow = True  #: not an error: spans do not record it as one


class Batch:
    """The triggers buffered by one optimistic batch of one workflow."""

    def __init__(self, conn: AsyncConnection[Any], workflow: str) -> None:
        self.conn = conn
        self.workflow = workflow
        self.pending: list[NewRun] = []
        #: every run added, in order, flushed or not (the runner re-writes those of the
        #: events before a failing one after rolling the attempt back)
        self.added: list[NewRun] = []
        self.active: dict[str, UUID] = {}  #: foreign id -> run buffered in this batch
        self.fallback: str | None = None  #: why the batch must run per event

    def abandon(self, reason: str) -> NeedsPerEventPath:
        """Mark the batch for the per-event path; returns the exception to raise.

        The mark survives a function that catches the exception."""
        if self.fallback is None:
            self.fallback = reason
        return NeedsPerEventPath(reason)

    def add(self, run: NewRun) -> UUID:
        """Buffer ``run``; returns its run id, as ``trigger`` would once it is written.

        A second run of a foreign id already triggered in this batch raises
        :class:`WorkflowInProgress` (the first is in progress), unless it is the same
        run id (an idempotent repeat: returns it)."""
        known = self.active.get(run.foreign_id)
        if known is not None:
            if known == run.run_id:
                return known
            raise in_progress(self.workflow, run.foreign_id)
        self.active[run.foreign_id] = run.run_id
        self.pending.append(run)
        self.added.append(run)
        return run.run_id

    async def flush(self) -> None:
        """Write the buffered runs (one statement); falls back when any was skipped."""
        if self.fallback is not None:
            raise NeedsPerEventPath(self.fallback)
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        inserted = await insert_runs(self.conn, self.workflow, pending)
        if len(inserted) != len(pending):
            raise self.abandon("a trigger hit an existing run (in progress, or same run id)")


class Optimism:
    """Whether a shard tries the optimistic path: yes, except for the 1, 2, 4 ... 64
    batches after a fallback (the penalty doubles while fallbacks repeat)."""

    MAX_PENALTY = 64

    def __init__(self) -> None:
        self._skip = 0
        self._penalty = 0

    def should_try(self) -> bool:
        if self._skip > 0:
            self._skip -= 1
            return False
        return True

    def succeeded(self) -> None:
        self._penalty = 0

    def fell_back(self) -> None:
        self._penalty = min(max(1, self._penalty * 2), self.MAX_PENALTY)
        self._skip = self._penalty
