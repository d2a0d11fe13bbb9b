"""Runs ``add_connector`` functions over events from outside sources: the loops.

With ``parallel_count=N`` the runner makes N consumers named by
:class:`pgflow.log.names.ConsumerName`: ``"<workflow>--<connector>-<i+1>-of-<N>"``
(e.g. ``orders--payments-1-of-2``). The name is what a source keys its position on (a
Redis consumer group, a NATS durable, a Kafka group, a RabbitMQ queue, a table cursor),
so it is scoped to the workflow: two workflows that each have a connector called
``payments`` on the same source keep separate positions and each sees every event.
The separator ``--`` and the rest of the name use only characters every shipped
broker accepts as-is when the workflow and connector names do (letters, digits, ``-``
and ``_``); connectors sanitise anything else themselves (e.g. NATS durables cannot
contain ``.``). Renaming a workflow or a connector therefore starts a new position.

Each consumer gets a supervised loop; what one batch does — the shard filter, the
optimistic and per-event paths, retries, dead letters — is
:class:`~pgflow.workflow._connector_batches.ConnectorBatches`, which the runner extends.

* Broker-like consumers (``recv() -> (event, ack)``): commit, then ack —
  at-least-once; ``trigger`` is idempotent (``WorkflowInProgress``, or an explicit
  ``run_id``) so a redelivery after a crash between commit and ack changes nothing.
  Events are batched as a transactional source's are (below: optimistic, else per
  event in savepoints, one commit), from what the consumer holds already: the first
  ``recv()`` waits, the next ones get one turn of the event loop each (a broker
  consumer returns from its prefetch buffer without waiting), up to ``batch_size``;
  a ``recv()`` that would wait is kept for the next batch, never cancelled (nothing
  received is dropped). The batch's acks are only noted in the transaction and
  called after the commit, in source order. A failing event stops the batch where
  it is (what succeeded before it commits and is acked); it and the events after it
  stay received, unacked, and are handled from there after its backoff — the same
  event order and retry / dead-letter rules as before, with one transaction per batch
  instead of one per event (bench ``memory-broker``: ~400 -> ~7,800 events/s).
* :class:`~pgflow.connectors.TransactionalConsumer` (a source in the same database):
  ``recv_batch_in(conn, batch_size)``, each event's ``fn`` in a savepoint, its ``ack``
  (the source cursor) in the same transaction, one commit — exactly-once. A consumer
  with the optional ``flush_in(conn)`` (e.g. the table connector, whose acks are
  in-memory) has it called once before the commit, to write its position in one
  statement; a ``LostCursor`` from it rolls the batch back and the next batch re-reads
  the cursor. A batch is first tried optimistically (:mod:`pgflow.workflow._batch_api`): no
  savepoints, the batch's triggers written in one statement; anything unusual (a
  failing function, a trigger that meets a run in progress, writes other than new
  runs, raw ``api.conn`` SQL) rolls the attempt back and runs the batch per event as
  described here.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection

from pgflow.connectors._base import Ack, ConnectorEvent, MalformedEvent, TransactionalConsumer
from pgflow.log.cursors import LostCursor
from pgflow.log.names import ConsumerName
from pgflow.workflow._connector_batches import ConnectorBatches, Items
from pgflow.workflow._dead_letters import dead_letter, dead_letter_consumer
from pgflow.workflow._engine import Engine
from pgflow.workflow._supervise import supervise
from pgflow.workflow.graph import ConnectorSpec

__all__ = ["ConnectorRunner", "consumer_name", "dead_letter", "dead_letter_consumer"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)


def consumer_name(workflow: str, connector: str, shard: int, count: int) -> str:
    """The consumer name of shard ``shard`` (0-based) of ``count`` of a workflow's
    connector: ``str(ConsumerName(workflow, connector, shard, count))``."""
    return str(ConsumerName(workflow, connector, shard, count))


@contextlib.asynccontextmanager
async def _flushed(consumer: Any, conn: AsyncConnection[Any]) -> AsyncIterator[None]:
    """Around a transactional batch, inside its transaction: when the batch body ends
    without an error, call the consumer's optional ``flush_in(conn)``
    (:class:`~pgflow.connectors._base.FlushesAcks`) so its deferred acks are written before
    the commit; if that raises (e.g. ``LostCursor``) the transaction rolls back."""
    yield
    flush = getattr(consumer, "flush_in", None)
    if flush is not None:
        await flush(conn)


class ConnectorRunner(ConnectorBatches[T, S]):
    """The consumers of one ``add_connector`` (see the module doc)."""

    def __init__(
        self,
        engine: Engine[T, S],
        spec: ConnectorSpec,
        on_give_up: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(engine, spec)
        self._on_give_up = on_give_up
        self.consumers: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        #: per broker shard: a recv() started by _gather and not consumed yet
        self._ahead: dict[int, asyncio.Future[tuple[ConnectorEvent, Ack]]] = {}

    async def start(self) -> None:
        for shard in range(self.count):
            consumer = await self.spec.connector.make(
                str(ConsumerName(self.engine.name, self.name, shard, self.count))
            )
            self.consumers.append(consumer)
            loop = functools.partial(
                self._transactional
                if isinstance(consumer, TransactionalConsumer)
                else self._broker,
                shard,
                consumer,
            )
            name = f"connector {self.name}[{shard}]"
            task = supervise(
                name, loop, stopping=self._stopping.is_set, on_give_up=self._on_give_up
            )
            self.tasks.append(
                asyncio.create_task(task, name=f"pgflow:connector:{self.name}:{shard}")
            )

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        for consumer in self.consumers:
            with contextlib.suppress(Exception):
                await consumer.close()
        self.consumers.clear()
        # The connector itself is the caller's (it may feed other workflows, or publish):
        # whoever made it closes it.

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True when the runner is stopping."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _backoff(self, backoff: float, message: str, *args: Any) -> float:
        """Log ``message`` (a failure the loop survives), wait ``backoff`` seconds (less
        when the runner stops: the loop then ends at its next check); the next backoff,
        doubled, at most 5 s."""
        logger.warning(message, *args)
        await self._sleep(backoff)
        return min(backoff * 2, 5.0)

    async def _db_error(self, backoff: float, shard: int, exc: BaseException) -> float:
        """:meth:`_backoff` after the database failed a batch (it rolled back)."""
        return await self._backoff(
            backoff, "connector %s[%d]: database error (%s)", self.name, shard, exc
        )

    async def _recv(self, shard: int, consumer: Any) -> tuple[ConnectorEvent, Ack] | None:
        """The next event (waiting for it), or None when the runner stops first."""
        recv = self._ahead.pop(shard, None) or asyncio.ensure_future(consumer.recv())
        stop = asyncio.ensure_future(self._stopping.wait())
        done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
        if recv in done:
            stop.cancel()
            result: tuple[ConnectorEvent, Ack] = recv.result()
            return result
        recv.cancel()
        with contextlib.suppress(BaseException):
            await recv
        return None

    async def _gather(self, shard: int, consumer: Any, first: tuple[ConnectorEvent, Ack]) -> Items:
        """``first`` and up to ``batch_size - 1`` more events that are there already.

        Each further ``recv()`` gets one turn of the event loop (a broker consumer
        returns from its buffer without waiting); one that needs to wait — or fails,
        or returns an event younger than ``consume_lag`` — ends the batch and is kept,
        not cancelled, for the next one (:meth:`_recv` takes it over), so nothing
        received is dropped and a failure keeps its place after the batch's acks."""
        opts = self.spec.options
        lag = opts.consume_lag.total_seconds()
        items = [first]
        while len(items) < opts.batch_size:
            recv = asyncio.ensure_future(consumer.recv())
            if not recv.done():
                await asyncio.sleep(0)
            if (
                not recv.done()
                or recv.exception() is not None
                or (lag > 0 and self._age(recv.result()[0]) < lag)
            ):
                self._ahead[shard] = recv
                break
            items.append(recv.result())
        return items

    async def _broker(self, shard: int, consumer: Any) -> None:
        try:
            await self._broker_loop(shard, consumer)
        finally:
            ahead = self._ahead.pop(shard, None)
            if ahead is not None and not ahead.done():
                ahead.cancel()  # unacked: the source redelivers what it held
            elif ahead is not None and not ahead.cancelled():
                ahead.exception()  # retrieved: redelivered later, not logged as lost

    async def _broker_loop(self, shard: int, consumer: Any) -> None:
        opts = self.spec.options
        backoff = 0.05
        items: Items = []  # received, not acked
        while not self._stopping.is_set():
            if not items:
                try:
                    got = await self._recv(shard, consumer)
                except MalformedEvent as bad:
                    await self._malformed(shard, bad)
                    continue
                except Exception as exc:
                    backoff = await self._backoff(
                        backoff, "connector %s[%d]: recv failed (%s)", self.name, shard, exc
                    )
                    continue
                backoff = 0.05
                if got is None:
                    return
                lag = opts.consume_lag.total_seconds()
                ripe_in = lag - self._age(got[0]) if self._mine(shard, got[0]) else 0.0
                if lag > 0 and await self._sleep(ripe_in):
                    return  # stopping: not acked, the source redelivers it
                items = await self._gather(shard, consumer, got)
            try:
                handled, wait, items, acks = await self._broker_batch(shard, items)
            except (psycopg.OperationalError, OSError) as exc:
                # rolled back, nothing acked: the same events again in a new transaction
                backoff = await self._db_error(backoff, shard, exc)
                continue
            backoff = 0.05
            for ack in acks:  # after the commit, in source order
                await ack()
            if handled:
                self.engine.poke()
            if wait > 0 and await self._sleep(wait):
                return  # stopping: the rest is not acked, the source redelivers it

    async def _broker_batch(self, shard: int, items: Items) -> tuple[int, float, Items, list[Ack]]:
        """``items`` in one transaction, as a transactional batch is handled (optimistic
        first, else per event with savepoints), except that every ack is only noted.

        Returns (events handled, seconds to wait before the rest, the rest — from an
        event that awaits its retry —, the acks to call once committed, in order)."""
        acks: list[Ack] = []

        def later(ack: Ack) -> Ack:
            async def note() -> None:
                acks.append(ack)

            return note

        if not any(self._mine(shard, event) for event, _ in items):
            return 0, 0.0, [], [ack for _, ack in items]  # no transaction for others' events
        noted = [(event, later(ack)) for event, ack in items]
        handled = 0
        wait: float | None = None
        rest = noted
        pool = await self.engine.pool()
        async with pool.connection() as conn, conn.transaction():
            if self._try_optimistic(shard):
                done = await self._optimistic(conn, shard, noted)
                if done is not None:
                    handled, wait, rest = done
            if wait is None and rest:
                more, wait, rest = await self._per_event(conn, shard, rest)
                handled += more
        left = items[len(items) - len(rest) :] if rest else []  # rest is a suffix
        return handled, wait or 0.0, left, acks

    async def _transactional(self, shard: int, consumer: Any) -> None:
        backoff = 0.05
        while not self._stopping.is_set():
            try:
                handled, wait = await self._transactional_batch(shard, consumer)
                backoff = 0.05
            except LostCursor as exc:  # rolled back; the next batch re-reads the cursor
                logger.info(
                    "connector %s[%d]: cursor moved concurrently (%s)", self.name, shard, exc
                )
                if await self._sleep(backoff):
                    return
                continue
            except (psycopg.OperationalError, OSError) as exc:
                backoff = await self._db_error(backoff, shard, exc)
                continue
            if handled:
                self.engine.poke()
            if wait > 0 and await self._sleep(wait):
                return

    async def _transactional_batch(self, shard: int, consumer: Any) -> tuple[int, float]:
        """One transaction; returns (events handled, seconds to wait before the next)."""
        opts = self.spec.options
        poll = opts.polling_frequency.total_seconds()
        pool = await self.engine.pool()
        handled = 0
        wait = 0.0
        async with pool.connection() as conn, conn.transaction(), _flushed(consumer, conn):
            try:
                items = await consumer.recv_batch_in(conn, opts.batch_size)
            except MalformedEvent as bad:
                await self._malformed(shard, bad, conn)  # acked in this transaction
                return 0, 0.0
            if len(items) < opts.batch_size:
                wait = poll  # drained: wait for the polling timer
            if items and self._try_optimistic(shard):
                done = await self._optimistic(conn, shard, items)
                if done is not None:
                    handled, stop, items = done
                    if stop is not None:
                        return handled, stop
                    if not items:
                        return handled, wait
                    # the rest of the batch (from the event that needs it) per event
            more, stop, _ = await self._per_event(conn, shard, items)
            handled += more
            if stop is not None:
                wait = stop
        return handled, wait
