"""A blocking facade over the workflow client calls, for Django/Flask/scripts.

::

    import pgflow.sync
    orders = pgflow.sync.connect(builder, "postgresql://…")   # or a built Workflow
    run_id = orders.trigger("order-1", initial=Order(...))
    rec = orders.wait_for("order-1", run_id, Status.PAID, timeout=10)

The facade owns a private event loop in a daemon thread; every call is submitted to it
and waited for, so it works from any thread (web server workers included) and never
touches the caller's own event loop. The wrapped Workflow belongs to that loop: do not
also use it from async code — build a second one for that.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import datetime
from typing import Any, Generic, TypeVar

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from pgflow.workflow.builder import Builder
from pgflow.workflow.listing import Order, Page
from pgflow.workflow.records import Record, RunState
from pgflow.workflow.workflow import Workflow

__all__ = ["SyncWorkflow", "connect"]

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)
R = TypeVar("R")

RunId = str | uuid.UUID


class SyncWorkflow(Generic[T, S]):
    """Blocking versions of the client calls of one :class:`pgflow.Workflow`."""

    def __init__(self, wf: Workflow[T, S]) -> None:
        self.workflow = wf
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"pgflow-sync:{wf.name}", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, R], timeout: float | None = None) -> R:
        if self._closed:
            coro.close()
            raise RuntimeError("this pgflow.sync workflow is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def trigger(
        self,
        foreign_id: str,
        initial: T | None = None,
        start_at: S | None = None,
        *,
        run_id: RunId | None = None,
    ) -> str:
        return self._call(self.workflow.trigger(foreign_id, initial, start_at, run_id=run_id))

    def latest(self, foreign_id: str) -> Record[T, S]:
        return self._call(self.workflow.latest(foreign_id))

    def exists(self, foreign_id: str) -> bool:
        return self._call(self.workflow.exists(foreign_id))

    def update_status(self, foreign_id: str, status: S) -> Record[T, S]:
        return self._call(self.workflow.update_status(foreign_id, status))

    def callback(self, foreign_id: str, status: S, payload: Any = None) -> Record[T, S] | None:
        return self._call(self.workflow.callback(foreign_id, status, payload))

    def pause(
        self, foreign_id: str, run_id: RunId | None = None, *, reason: str | None = None
    ) -> Record[T, S]:
        return self._call(self.workflow.pause(foreign_id, run_id, reason=reason))

    def resume(
        self, foreign_id: str, run_id: RunId | None = None, *, reason: str | None = None
    ) -> Record[T, S]:
        return self._call(self.workflow.resume(foreign_id, run_id, reason=reason))

    def cancel(
        self, foreign_id: str, run_id: RunId | None = None, *, reason: str | None = None
    ) -> Record[T, S]:
        return self._call(self.workflow.cancel(foreign_id, run_id, reason=reason))

    def retry(
        self, foreign_id: str, run_id: RunId | None = None, *, reason: str | None = None
    ) -> Record[T, S]:
        return self._call(self.workflow.retry(foreign_id, run_id, reason=reason))

    def delete_data(
        self, foreign_id: str, run_id: RunId | None = None, *, reason: str | None = None
    ) -> Record[T, S]:
        return self._call(self.workflow.delete_data(foreign_id, run_id, reason=reason))

    def schedule(
        self,
        foreign_id: str,
        spec: str,
        *,
        initial: T | None = None,
        filter: Callable[[datetime], bool | Awaitable[bool]] | None = None,
    ) -> datetime:
        return self._call(self.workflow.schedule(foreign_id, spec, initial=initial, filter=filter))

    def wait_for(
        self, foreign_id: str, run_id: RunId, status: S, timeout: float | None = 10.0
    ) -> Record[T, S]:
        return self._call(self.workflow.wait_for(foreign_id, run_id, status, timeout=timeout))

    def list(
        self,
        *,
        status: S | Iterable[S] | None = None,
        run_state: RunState | str | Iterable[RunState | str] | None = None,
        foreign_id: str | Iterable[str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        order: Order = "desc",
        limit: int = 50,
        after: str | None = None,
    ) -> Page[Record[T, S]]:
        return self._call(
            self.workflow.list(
                status=status,
                run_state=run_state,
                foreign_id=foreign_id,
                created_after=created_after,
                created_before=created_before,
                order=order,
                limit=limit,
                after=after,
            )
        )

    def close(self) -> None:
        """Close the pool and stop the private loop (idempotent)."""
        if self._closed:
            return
        try:
            self._call(self.workflow.close(), timeout=60)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> SyncWorkflow[T, S]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    workflow: Builder[T, S] | Workflow[T, S],
    dsn_or_pool: str | AsyncConnectionPool[AsyncConnection[Any]] | None = None,
    *,
    pooler: str | None = None,
) -> SyncWorkflow[T, S]:
    """A blocking client for ``workflow`` (a Builder is built with ``dsn_or_pool`` and
    ``pooler``, see :meth:`pgflow.Builder.build`)."""
    wf = workflow.build(dsn_or_pool, pooler=pooler) if isinstance(workflow, Builder) else workflow
    return SyncWorkflow(wf)
