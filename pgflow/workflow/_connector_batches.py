"""How a connector's batch of events is handled inside one transaction.

:class:`ConnectorBatches` is the half of the connector runner
(:class:`pgflow.workflow._connectors.ConnectorRunner`) that does not care where the
events came from: given a transaction and the events (each with its ack), it runs
``fn(api, event)`` for those of its shard and decides what each failure means. The
runner's loops (broker: commit then ack; transactional: the ack in the transaction)
call it.

* Per event (:meth:`~ConnectorBatches._per_event`): each event's function in a
  savepoint of the batch's transaction, with ``api = wf.bind(conn)``, so everything it
  does through the API commits together, then its ack.
* Optimistic (:meth:`~ConnectorBatches._optimistic`, :mod:`pgflow.workflow._batch_api`):
  no savepoints, the batch's triggers written in one statement; anything unusual (a
  failing function, a trigger that meets a run in progress, writes other than new
  runs, raw ``api.conn`` SQL) rolls the attempt back and the batch goes per event.

Consumer ``i`` of ``N`` handles only the events with ``shard_hash(event.foreign_id) % N
== i`` and acks the others, so on a source that delivers every event to every
consumer, each event is handled once, and one entity's events in order by one shard.

Failures are retried after ``err_backoff`` doubling each attempt, in order and without
holding a transaction open while waiting (the batch commits what succeeded before the
failing event and stops there). After ``max_retries`` attempts the event goes to
``pgflow.dead_letters`` (:mod:`pgflow.workflow._dead_letters`) with the reason and is
acked. ``consume_lag`` holds events back until they are that old; ``lag_alert`` logs a
warning and emits the ``lag_alert`` metric when an event being processed is older.
"""

from __future__ import annotations

import enum
import logging
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from psycopg import AsyncConnection

from pgflow.connectors._base import Ack, ConnectorEvent, MalformedEvent, Reject
from pgflow.log.events import shard_hash
from pgflow.observability import connector_span, metrics
from pgflow.workflow._batch_api import Batch, NeedsPerEventPath, Optimism
from pgflow.workflow._dead_letters import dead_letter, dead_letter_consumer
from pgflow.workflow._engine import Engine
from pgflow.workflow._failures import contained, error_text
from pgflow.workflow.api import API
from pgflow.workflow.graph import ConnectorSpec
from pgflow.workflow.records import insert_runs

__all__ = ["ConnectorBatches", "Items"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)

#: events with their acks, in source order
Items = list[tuple[ConnectorEvent, Ack]]


class ConnectorBatches(Generic[T, S]):
    """Handles batches of one ``add_connector``'s events (see the module doc)."""

    def __init__(self, engine: Engine[T, S], spec: ConnectorSpec) -> None:
        self.engine = engine
        self.spec = spec
        self.name = spec.name
        #: this connector's pgflow.dead_letters.consumer (see dead_letter_consumer)
        self.dead_letter_consumer = dead_letter_consumer(engine.name, spec.name)
        self.count = spec.options.parallel_count
        self._attempts: dict[tuple[int, str], int] = {}
        self._optimism = [Optimism() for _ in range(self.count)]
        self.fallbacks = 0  #: optimistic batches that fell back to the per-event path
        self.handled = 0  #: events whose function succeeded (tests, metrics)
        self.dead = 0  #: events dead-lettered

    def _mine(self, shard: int, event: ConnectorEvent) -> bool:
        return self.count == 1 or shard_hash(event.foreign_id) % self.count == shard

    def _age(self, event: ConnectorEvent) -> float:
        created = event.created_at
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        return (datetime.now(UTC) - created).total_seconds()

    def _check_lag(self, shard: int, event: ConnectorEvent) -> None:
        alert = self.spec.options.lag_alert
        if alert is None:
            return
        age = self._age(event)
        if age > alert.total_seconds():
            metrics.lag_alert(self.name, shard, age)
            logger.warning(
                "connector %s[%d]: event %s for %r is %.1fs old (lag_alert %s)",
                self.name,
                shard,
                event.id,
                event.foreign_id,
                age,
                alert,
            )

    async def _call(
        self,
        conn: AsyncConnection[Any],
        shard: int,
        event: ConnectorEvent,
        api: API[T, S] | None = None,
    ) -> None:
        attributes = {
            "workflow": self.engine.name,
            "connector": self.name,
            "foreign_id": event.foreign_id,
            "event_type": event.type,
            "shard": shard,
        }
        with connector_span(self.name, event.id, attributes, headers=event.headers):
            await self.spec.fn(api if api is not None else API(self.engine, conn), event)

    async def _per_event(
        self, conn: AsyncConnection[Any], shard: int, items: Items
    ) -> tuple[int, float | None, Items]:
        """Each event's function in a savepoint of ``conn``'s transaction, then its ack.

        Returns (events handled, seconds to wait or None, the items left from the event
        that stopped the batch: one not ripe yet, or one that awaits its retry)."""
        opts = self.spec.options
        handled = 0
        for index, (event, ack) in enumerate(items):
            if not self._mine(shard, event):
                await ack()
                continue
            lag = opts.consume_lag.total_seconds()
            if lag > 0 and self._age(event) < lag:  # not ripe: stop, unacked
                wait = min(opts.polling_frequency.total_seconds(), lag - self._age(event))
                return handled, wait, items[index:]
            self._check_lag(shard, event)
            try:
                async with conn.transaction():  # savepoint per event
                    await self._call(conn, shard, event)
            except BaseException as exc:
                if not contained(exc):
                    raise
                retry_in = await self._event_failed(conn, shard, event, ack, exc)
                if retry_in is None:
                    continue  # dead-lettered (and acked)
                return handled, retry_in, items[index:]  # commit what succeeded
            self._event_done(shard, event)
            await ack()
            handled += 1
        return handled, None, []

    async def _event_failed(
        self,
        conn: AsyncConnection[Any],
        shard: int,
        event: ConnectorEvent,
        ack: Ack,
        exc: BaseException,
    ) -> float | None:
        """A transactional event's function failed (its effects are rolled back): dead-
        letter and ack it after ``max_retries`` (returns None), else the seconds until
        its retry (the batch stops there, unacked)."""
        opts = self.spec.options
        metrics.error(self.name, shard)
        key = (shard, event.id)
        attempt = self._attempts.get(key, 0) + 1
        if attempt >= opts.max_retries or isinstance(exc, Reject):
            self._attempts.pop(key, None)
            await self._dead_letter(shard, event, exc, attempt, conn)
            await ack()
            return None
        self._attempts[key] = attempt
        wait = opts.backoff(attempt).total_seconds()
        self._retrying(shard, event, exc, attempt, wait)
        return wait

    def _event_done(self, shard: int, event: ConnectorEvent) -> None:
        self._attempts.pop((shard, event.id), None)
        metrics.success(self.name, shard)
        self.handled += 1

    async def _malformed(
        self, shard: int, bad: MalformedEvent, conn: AsyncConnection[Any] | None = None
    ) -> None:
        """Bad input: dead-letter it with the reason and payload, then ack it."""
        logger.error("connector %s[%d]: %s (dead-lettered)", self.name, shard, bad)
        await self._store_dead_letter(shard, bad, bad.reason, 1, conn)
        await bad.ack()

    async def _dead_letter(
        self,
        shard: int,
        event: ConnectorEvent,
        exc: BaseException,
        attempts: int,
        conn: AsyncConnection[Any] | None = None,
    ) -> None:
        """Record ``event`` in ``pgflow.dead_letters`` — in ``conn``'s transaction when
        given (the transactional path acks it there too), else in a transaction of its own."""
        logger.error(
            "connector %s[%d]: event %s dead-lettered after %d attempts: %s",
            self.name,
            shard,
            event.id,
            attempts,
            error_text(exc),
        )
        await self._store_dead_letter(shard, event, error_text(exc), attempts, conn)

    async def _store_dead_letter(
        self,
        shard: int,
        event: ConnectorEvent | MalformedEvent,
        reason: str,
        attempts: int,
        conn: AsyncConnection[Any] | None,
    ) -> None:
        if conn is None:
            pool = await self.engine.pool()
            async with pool.connection() as own, own.transaction():
                await dead_letter(own, self.dead_letter_consumer, event, reason, attempts)
        else:
            await dead_letter(conn, self.dead_letter_consumer, event, reason, attempts)
        metrics.dead_letter(self.name, shard)
        self.dead += 1

    def _retrying(
        self, shard: int, event: ConnectorEvent, exc: BaseException, attempt: int, wait: float
    ) -> None:
        metrics.retry(self.name, shard)
        logger.warning(
            "connector %s[%d]: event %s failed (attempt %d/%d): %s; retry in %.2fs",
            self.name,
            shard,
            event.id,
            attempt,
            self.spec.options.max_retries,
            error_text(exc),
            wait,
        )

    def _try_optimistic(self, shard: int) -> bool:
        if any(key[0] == shard for key in self._attempts):
            return False  # an event of this shard awaits its retry: per event, alone
        return self._optimism[shard].should_try()

    async def _optimistic(
        self, conn: AsyncConnection[Any], shard: int, items: Items
    ) -> tuple[int, float | None, Items] | None:
        """Handle ``items`` without per-event savepoints.

        Returns (events handled, seconds to wait or None, the items left: for the
        per-event path when no wait is given, else from the event that stopped the
        batch — a transactional source re-reads those, a broker keeps them) — or None
        when the whole batch fell back, leaving nothing behind (its savepoint rolled
        back, nothing acked).

        When the function of one event fails (raises, or needs the per-event path), the
        events before it are NOT run again: in this mode a function that returned has
        no effect but the runs it buffered, so after the attempt's savepoint is rolled
        back those runs are written again in one statement and the events acked. The
        failing event is then handled as the per-event path would (its exception counts
        as an attempt: retried later or dead-lettered) — or, when it needs the per-event
        path, it and the rest of the batch go there. A connector function therefore
        runs once per event in normal operation; only a function that needs the per-event
        path (it used ``api.conn``...) or a trigger that hits an existing run runs again.
        """
        lag = self.spec.options.consume_lag.total_seconds()
        batch = Batch(conn, self.engine.name)
        api: API[T, S] = API(self.engine, conn, batch)
        acks: list[Ack] = []
        handled: list[ConnectorEvent] = []
        wait: float | None = None
        failed_at: int | None = None
        unripe: int | None = None
        failure: BaseException | None = None
        try:
            async with conn.transaction():  # undone as a whole if the attempt falls back
                for index, (event, ack) in enumerate(items):
                    if not self._mine(shard, event):
                        acks.append(ack)
                        continue
                    if lag > 0 and self._age(event) < lag:  # not ripe: stop, unacked
                        wait = min(
                            self.spec.options.polling_frequency.total_seconds(),
                            lag - self._age(event),
                        )
                        unripe = index
                        break
                    mark = len(batch.added)
                    try:
                        await self._call(conn, shard, event, api)
                        if batch.fallback is not None:  # the function swallowed the signal
                            raise NeedsPerEventPath(batch.fallback)
                    except BaseException as exc:
                        if not contained(exc):
                            raise
                        failed_at, failure = index, exc
                        del batch.added[mark:]  # the failing event's runs are not kept
                        raise _Partial from exc
                    acks.append(ack)
                    handled.append(event)
                await batch.flush()
        except _Partial:
            pass
        except BaseException as exc:
            if not contained(exc):
                raise
            self._fell_back(shard, batch.fallback or error_text(exc))
            return None
        if failed_at is not None:
            assert failure is not None
            try:
                async with conn.transaction():  # the runs of the events that succeeded
                    if len(await insert_runs(conn, self.engine.name, batch.added)) != len(
                        batch.added
                    ):
                        raise NeedsPerEventPath("a run was triggered concurrently")
            except NeedsPerEventPath as exc:
                self._fell_back(shard, str(exc))
                return None
            self._optimism[shard].succeeded()
            if isinstance(failure, NeedsPerEventPath) or batch.fallback is not None:
                self._optimism[shard].fell_back()  # this event's function runs again
                self.fallbacks += 1
        else:
            self._optimism[shard].succeeded()
        for ack in acks:  # in source order, after everything else succeeded
            await ack()
        for event in handled:
            self._check_lag(shard, event)
            self._event_done(shard, event)
        if failed_at is None:
            return len(handled), wait, [] if unripe is None else items[unripe:]
        assert failure is not None
        if isinstance(failure, NeedsPerEventPath) or batch.fallback is not None:
            return len(handled), None, items[failed_at:]
        event, ack = items[failed_at]
        retry_in = await self._event_failed(conn, shard, event, ack, failure)
        if retry_in is not None:
            return len(handled), retry_in, items[failed_at:]  # stop here: retry it later
        return len(handled), None, items[failed_at + 1 :]

    def _fell_back(self, shard: int, reason: str) -> None:
        self._optimism[shard].fell_back()
        self.fallbacks += 1
        logger.debug(
            "connector %s[%d]: optimistic batch falls back to per event: %s",
            self.name,
            shard,
            reason,
        )


class _Partial(Exception):
    """Rolls the optimistic attempt back when one event's function failed (see
    ``ConnectorBatches._optimistic``)."""

    control_flow = True  #: not an error: spans do not record it as one
