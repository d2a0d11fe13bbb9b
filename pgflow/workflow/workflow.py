"""``pgflow.Workflow``: a built workflow — its client API plus the worker that runs it.

``Builder.build(...)`` returns one. Used as a client only (a web app that triggers
runs), it opens its bounded pool on first use. ``await wf.run()`` (or
``async with wf:``) also starts this process's share of the work: a step consumer per
(step, shard), a timer armer per (timeout status, shard), the timer poller and the connector
runners. Start as many worker processes as you like: each (consumer, shard) batch is
processed by one of them at a time (advisory lock + cursor compare-and-set), and a
killed worker's shards are picked up by the others at their next poll.

Connection budget per process: one LISTEN connection plus the pool (``pool_size``).
Behind a transaction pooler (``pooler="transaction"``) the LISTEN connection goes to
``listen_dsn`` (a direct or session-pooled DSN); without one the consumers poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, TypeVar

from psycopg import AsyncConnection

from pgflow.log.cursors import BatchOutcome, BatchResult, Consumer
from pgflow.log.listener import acquire_listener, release_listener
from pgflow.log.names import ConsumerName
from pgflow.observability import metrics, sample_forever, tracing_enabled
from pgflow.workflow._connectors import ConnectorRunner
from pgflow.workflow._engine import Engine
from pgflow.workflow._hooks import HOOK_KINDS, HookConsumer
from pgflow.workflow._poller import Poller
from pgflow.workflow._steps import StepConsumer
from pgflow.workflow._supervise import supervise
from pgflow.workflow._timeouts import TimerArmer
from pgflow.workflow.api import API, run_id_for

__all__ = ["ConsumerState", "Workflow"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)


class ConsumerState(enum.StrEnum):
    """What one consumer of this process is doing (:meth:`Workflow.states`)."""

    STARTING = "starting"  #: spawned; no batch attempt finished yet
    RUNNING = "running"  #: consuming (this process owns the shard)
    IDLE = "idle"  #: another process holds the shard; this one stands by
    SHUTDOWN = "shutdown"  #: stopped (or crashed: see the log)


class Workflow(API[T, S], Generic[T, S]):
    """A runnable workflow (see the module doc). Create it with ``Builder.build``."""

    def __init__(self, engine: Engine[T, S]) -> None:
        """Run ``engine``'s workflow (``Builder.build`` makes the engine: the graph,
        the codecs, the hooks, the connection settings)."""
        super().__init__(engine)
        self.graph = engine.graph
        self.object_type = engine.objects.type
        self.consumers: list[Consumer] = []
        self.poller: Poller[T, S] | None = None
        self.runners: list[ConnectorRunner[T, S]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._task_of: dict[str, asyncio.Task[None]] = {}
        self._outcomes: dict[str, BatchOutcome] = {}
        self._running = False
        self._sampler: asyncio.Task[None] | None = None
        #: set when a supervised task gave up (``failure`` says which and why): the
        #: process no longer runs all its consumers (``pgflow worker`` exits non-zero)
        self.failed = asyncio.Event()
        self.failure: str | None = None

    @property
    def engine(self) -> Engine[T, S]:
        return self._engine

    @property
    def running(self) -> bool:
        return self._running

    def mermaid(self, direction: str | None = None) -> str:
        return self.graph.mermaid(direction)

    async def run(self) -> None:
        """Start consuming in the background and return (``stop()`` ends it)."""
        if self._running:
            return
        engine = self._engine
        # shared by the process's workflows; without a LISTEN session (transaction
        # pooler, no listen_dsn) an in-process hub: consumers poll, and say so once
        listener = await acquire_listener(engine.listen_dsn)
        engine.listener = listener
        pool = await engine.pool()
        if engine.notifier is not None:
            engine.notifier.listener = listener
        intervals: list[timedelta] = []
        for step in self.graph.steps.values():
            intervals.append(step.options.polling_frequency)
            for shard in range(step.options.parallel_count):
                consumer = StepConsumer(engine, step, shard).make_consumer(pool)
                self.consumers.append(consumer)
            if step.options.lag_alert is not None:
                # the sampler then sees lag_alert crossings (and recoveries) by itself
                metrics.set_lag_alert(consumer.key.consumer, step.options.lag_alert.total_seconds())
        for timeouts in self.graph.timeouts.values():  # one armer per status
            intervals += [t.options.polling_frequency for t in timeouts]
            for shard in range(timeouts[0].options.parallel_count):
                self.consumers.append(TimerArmer(engine, timeouts, shard).make_consumer(pool))
        self.failure = None
        self.failed.clear()
        poll = min(intervals, default=timedelta(seconds=1)).total_seconds()
        for kind in HOOK_KINDS:  # after-commit hooks (pgflow._hooks)
            if engine.hooks.get(kind):
                self.consumers.append(HookConsumer(engine, kind, 100, poll).make_consumer(pool))
        for consumer in self.consumers:
            self._track(consumer)
            self._spawn(consumer.run, str(consumer.key), consumer.stopping)
        interval = min(intervals, default=timedelta(seconds=1))
        poller = self.poller = Poller(engine, interval, self._trigger_scheduled)
        self._spawn(poller.run, f"{engine.name}/poller", poller.stopping)
        for spec in self.graph.connectors.values():
            runner = ConnectorRunner(engine, spec, self._give_up)
            self.runners.append(runner)
            await runner.start()
        # Resolve the OTEL_* configuration now, not inside the first event's span.
        tracing_enabled()
        if metrics.enabled or metrics.has_lag_alerts:
            self._sampler = asyncio.create_task(
                sample_forever(pool), name=f"pgflow:{engine.name}/lag-sampler"
            )
        self._running = True
        logger.info(
            "workflow %s running: %d consumers, %d connector runners",
            engine.name,
            len(self.consumers),
            len(self.runners),
        )

    async def _trigger_scheduled(
        self,
        conn: AsyncConnection[Any],
        foreign_id: str,
        initial: Any,
        run_id_parts: tuple[str, ...],
        headers: Mapping[str, str],
    ) -> str:
        """A due schedule's run, in the poller's transaction (``_schedules.ScheduleTrigger``)."""
        return await self.bind(conn).trigger(
            foreign_id, initial, run_id=run_id_for(*run_id_parts), headers=headers
        )

    def _spawn(
        self, loop: Callable[[], Awaitable[None]], name: str, stopping: Callable[[], bool]
    ) -> None:
        """Start ``loop`` supervised: restarted when it dies (see ``_supervise``)."""
        task = asyncio.create_task(
            supervise(name, loop, stopping=stopping, on_give_up=self._give_up),
            name=f"pgflow:{name}",
        )
        self._tasks.append(task)
        self._task_of[name] = task

    def _give_up(self, message: str) -> None:
        """A supervised task keeps dying: this process cannot do its share of the work."""
        if self.failure is None:
            self.failure = message
        self.failed.set()

    def _track(self, consumer: Consumer) -> None:
        """Remember each batch's outcome for :meth:`states` (chains ``on_batch``)."""
        name = str(consumer.key)
        previous = consumer.on_batch

        def on_batch(result: BatchResult) -> None:
            self._outcomes[name] = result.outcome
            if previous is not None:
                previous(result)

        consumer.on_batch = on_batch

    def states(self) -> dict[str, ConsumerState]:
        """What each consumer of this process is doing (luno ``States()``).

        Keys: step consumers and timer armers (``"<workflow>/<STATUS>[/timeout]"`` plus
        the shard when sharded, as in ``pgflow lag``), ``"<workflow>/poller"`` and
        connector consumers (``"<workflow>--<name>-<i>-of-<N>"``). ``IDLE`` means
        another process holds that shard right now (it takes over if that one dies).
        Empty before :meth:`run` and after :meth:`stop`.
        """
        out: dict[str, ConsumerState] = {}
        for name, task in self._task_of.items():
            outcome = self._outcomes.get(name)
            if task.done():
                out[name] = ConsumerState.SHUTDOWN
            elif outcome is BatchOutcome.LOCKED:
                out[name] = ConsumerState.IDLE
            elif outcome is None and name != f"{self.name}/poller":
                out[name] = ConsumerState.STARTING
            else:
                out[name] = ConsumerState.RUNNING
        for runner in self.runners:
            for shard, task in enumerate(runner.tasks):
                key = str(ConsumerName(self.name, runner.name, shard, runner.count))
                out[key] = ConsumerState.SHUTDOWN if task.done() else ConsumerState.RUNNING
        return out

    async def stop(self, timeout: float = 30.0) -> None:
        """Finish the batches in flight (they commit or roll back), then shut down."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(BaseException):
                await self._sampler
            self._sampler = None
        for consumer in self.consumers:
            consumer.stop()
        if self.poller is not None:
            self.poller.stop()
        for runner in self.runners:
            runner.stop()
        waiting = list(self._tasks) + [t for r in self.runners for t in r.tasks]
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=timeout)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(BaseException):
                    await task
        for runner in self.runners:
            await runner.close()
        self._tasks.clear()
        self._task_of.clear()
        self._outcomes.clear()
        self.consumers.clear()
        self.runners.clear()
        self.poller = None
        engine = self._engine
        if engine.listener is not None:
            await release_listener(engine.listener)
            engine.listener = None
        await engine.close()
        self._running = False

    async def close(self) -> None:
        """Stop if running and close the pool (a client-only workflow calls this)."""
        await self.stop()

    async def __aenter__(self) -> Workflow[T, S]:
        await self.run()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
