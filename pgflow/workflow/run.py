"""``pgflow.Run``: what a step, callback, timeout or hook receives.

A run is the record (``status``, ``object``, ids, times) plus ``tx``: the
``psycopg.AsyncConnection`` whose transaction will commit this transition. Writes an
app makes through ``run.tx`` commit atomically with the workflow's state change — and
roll back with it when the step fails or its transition loses a race.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from psycopg import AsyncConnection

from pgflow.workflow.records import RawRecord, Record, RunState

__all__ = ["Run", "RunEngine"]

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)


class RunEngine(Protocol[T, S]):
    """What a :class:`Run` asks of the engine that made it
    (:class:`pgflow.workflow._engine.Engine`). Declared here, on the lower side, so
    that ``run`` does not import the engine that imports it."""

    def to_record(self, raw: RawRecord, *, obj: Any = ...) -> Record[T, S]: ...

    async def change_state(
        self, run: Run[T, S], state: RunState, reason: str | None = None
    ) -> None: ...

    async def save_and_repeat(self, run: Run[T, S]) -> None: ...


class Run(Generic[T, S]):
    """One run of a workflow, inside the transaction that will move it."""

    __slots__ = ("_engine", "_raw", "_record", "_tx", "changed", "object", "tx_used")

    def __init__(
        self,
        engine: RunEngine[T, S],
        raw: RawRecord,
        record: Record[T, S],
        tx: AsyncConnection[Any],
    ) -> None:
        self._engine = engine
        self._raw = raw
        self._record = record
        #: the run's object; mutate it or assign a new one: a transition stores it
        self.object: T = record.object
        self._tx = tx
        #: set when the code given this run touched ``run.tx`` (the step consumer then
        #: knows the step writes to the database and isolates it in a savepoint)
        self.tx_used = False
        #: set when pause()/cancel() already changed the run inside this call
        self.changed = False

    @property
    def tx(self) -> AsyncConnection[Any]:
        """The transaction this transition commits in: app writes made here commit
        atomically with the workflow's state change, or not at all."""
        self.tx_used = True
        return self._tx

    @property
    def record(self) -> Record[T, S]:
        return self._record

    @property
    def workflow_name(self) -> str:
        return self._record.workflow_name

    @property
    def foreign_id(self) -> str:
        return self._record.foreign_id

    @property
    def run_id(self) -> str:
        return self._record.run_id

    @property
    def run_state(self) -> RunState:
        return self._record.run_state

    @property
    def status(self) -> S:
        return self._record.status

    @property
    def created_at(self) -> datetime:
        return self._record.created_at

    @property
    def updated_at(self) -> datetime:
        return self._record.updated_at

    @property
    def version(self) -> int:
        return self._record.version

    @property
    def err_count(self) -> int:
        return self._record.err_count

    @property
    def last_error(self) -> str | None:
        return self._record.last_error

    async def pause(self, reason: str | None = None) -> None:
        """Pause this run now (in ``tx``); ``return await run.pause("why")`` from a step.
        The reason is stored on the record (``run_state_reason``)."""
        await self._engine.change_state(self, RunState.PAUSED, reason)

    async def cancel(self, reason: str | None = None) -> None:
        """Cancel this run now (in ``tx``); ``return await run.cancel("why")`` from a step."""
        await self._engine.change_state(self, RunState.CANCELLED, reason)

    async def skip(self) -> None:
        """No transition: the run stays where it is (``return await run.skip()``).
        Same as returning None (luno ``Skip``, status 0)."""
        return None

    async def save_and_repeat(self) -> None:
        """Store ``object``, keep the status, and run this step again later
        (``return await run.save_and_repeat()``; luno ``SaveAndRepeat``).

        The stored change appends a new event of the same status at the back of the
        log, so other runs' events are handled first: a long batch job can work in
        chunks, committing its progress (and its ``run.tx`` writes) after each one.
        Timeouts on the status are armed again for the new record version."""
        await self._engine.save_and_repeat(self)

    def _moved(self, raw: RawRecord) -> None:
        """Point this run at its new record version after a change written through it."""
        self._raw = raw
        self._record = self._engine.to_record(raw, obj=self.object)

    def __repr__(self) -> str:
        return (
            f"Run({self.workflow_name!r}, foreign_id={self.foreign_id!r}, "
            f"run_id={self.run_id!r}, status={self.status.name}, {self.run_state})"
        )
