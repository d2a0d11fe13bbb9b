"""``on_complete`` / ``on_pause`` / ``on_cancel`` hooks, run after the change commits.

A hook used to run inside the transaction of the change it reports: a failing hook
rolled the change back — for ``on_complete`` that meant the step that completed the
run ran again (two hook failures, three step runs). Like luno/workflow, hooks now run
*after* the change committed, from the event log: one :class:`~pgflow.log.cursors.Consumer`
per hook kind (``"<workflow>/on_complete"``...) reads the workflow's events and, for
each event of that kind (``headers.run_state == COMPLETED``; ``headers.change ==
pause`` / ``cancel``), calls the hooks with the run as it is now.

Delivery is at least once. A hook that raises is logged with its traceback and its
batch is rolled back and retried with the consumer's backoff; the retry goes one event
per batch (so the hooks of the events before the failing one do not run over and over)
until a batch succeeds. A hook's ``run.tx`` writes commit together with the hook
cursor, once. Only the hooks of one kind wait on a failing hook — never a step.

Events written before migration 0006 (``pgflow.hooks_from``) are skipped: the code
that wrote them ran their hooks in the transaction already, so an upgrade does not
fire every past run's hooks again.

``Builder.on_complete(fn, in_transaction=True)`` keeps the old behaviour for a hook
that must be atomic with the change (its failure rolls the change back).
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Generic, TypeVar

from psycopg import AsyncConnection

from pgflow.log.cursors import BatchOutcome, BatchResult, Consumer, CursorKey
from pgflow.log.events import Event
from pgflow.log.streamer import Filter
from pgflow.workflow._engine import Engine, maybe_await
from pgflow.workflow._failures import error_text
from pgflow.workflow.records import RunState, load_many

__all__ = ["HOOK_KINDS", "HookConsumer"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)

#: hook kind -> does this event report it?
HOOK_KINDS = {
    "complete": lambda h: h.get("run_state") == str(RunState.COMPLETED),
    "pause": lambda h: h.get("change") == "pause",
    "cancel": lambda h: h.get("change") == "cancel",
}


class HookConsumer(Generic[T, S]):
    """Runs one workflow's hooks of one kind after commit (see the module doc)."""

    def __init__(self, engine: Engine[T, S], kind: str, batch_size: int, poll: float) -> None:
        self.engine = engine
        self.kind = kind
        self.hooks = engine.hooks.get(kind, ())
        self.name = f"{engine.name}/on_{kind}"
        self.key = CursorKey(self.name)
        types = None
        if kind == "complete":  # only terminal statuses can complete a run
            types = tuple(s.name for s in engine.statuses.enum if engine.graph.is_terminal(s))
        self.filter = Filter(stream=engine.name, types=types or None)
        self.batch_size = batch_size
        self.poll = poll
        self.consumer: Consumer | None = None
        self.calls = 0  #: hook calls that succeeded (tests)
        #: events up to this id predate after-commit hooks (migration 0006)
        self.hooks_from: int | None = None

    def make_consumer(self, pool: Any) -> Consumer:
        self.consumer = self.engine.consumer(
            pool,
            self,
            batch_size=self.batch_size,
            poll_interval=self.poll,
            on_batch=self._after_batch,
        )
        return self.consumer

    def _after_batch(self, result: BatchResult) -> None:
        if result.outcome is BatchOutcome.APPLIED and self.consumer is not None:
            self.consumer.batch_size = self.batch_size  # a batch succeeded: full size again

    async def handle(self, events: list[Event], conn: AsyncConnection[Any]) -> None:
        if self.hooks_from is None:
            cur = await conn.execute("SELECT coalesce(max(event_id), 0) FROM pgflow.hooks_from")
            row = await cur.fetchone()
            self.hooks_from = int(row[0]) if row else 0
        wanted = [
            e
            for e in events
            if e.run_id is not None
            and e.id > self.hooks_from  # older ones had their hooks run in-transaction
            and HOOK_KINDS[self.kind](e.headers)
        ]
        if not wanted:
            return
        records = await load_many(conn, [e.run_id for e in wanted if e.run_id is not None])
        for event in wanted:
            assert event.run_id is not None
            rec = records.get(event.run_id)
            if rec is None:
                continue  # pruned since
            for hook in self.hooks:
                try:
                    async with conn.transaction():
                        await maybe_await(hook(self.engine.make_run(rec, conn)))
                except Exception as exc:
                    logger.warning(
                        "workflow %s: on_%s hook %s failed for run %s (foreign id %r): %s;"
                        " retrying",
                        self.engine.name,
                        self.kind,
                        getattr(hook, "__qualname__", hook),
                        rec.run_id,
                        rec.foreign_id,
                        error_text(exc),
                        exc_info=exc,
                    )
                    if self.consumer is not None:
                        self.consumer.batch_size = 1  # retry one event at a time
                    raise
                self.calls += 1
