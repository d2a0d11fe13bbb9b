"""The timer poller: one loop per Workflow process for all time-driven work.

Every ``polling_frequency`` (or at once when the clock jumps, or when a job found a
full batch) :meth:`Poller.tick` runs each job in turn on one pooled connection:

- :func:`~pgflow.workflow._timeouts.fire_timeouts` — due timeouts, exactly once;
- :func:`~pgflow.workflow._retries.emit_retries` — failed steps whose retry is due;
- :func:`~pgflow.workflow._retries.resume_paused` — runs whose ``pause_retry`` passed;
- :func:`~pgflow.workflow._schedules.fire_schedules` — cron schedules, once per tick;
- :func:`~pgflow.workflow._erasure.erase` — data erasures interrupted halfway.

Each job claims its rows ``FOR UPDATE SKIP LOCKED`` in its own transaction, so any
number of worker processes poll side by side. A database outage backs the loop off
(doubling up to 5 s) and logs once; any other error of a tick is logged and the next
tick goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
from datetime import timedelta
from typing import Generic, TypeVar

import psycopg

from pgflow.workflow._engine import Engine
from pgflow.workflow._erasure import erase
from pgflow.workflow._retries import emit_retries, resume_paused
from pgflow.workflow._schedules import ScheduleTrigger, fire_schedules
from pgflow.workflow._timeouts import fire_timeouts

__all__ = ["Poller"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)


class Poller(Generic[T, S]):
    """The per-process timer loop (see the module doc)."""

    def __init__(
        self,
        engine: Engine[T, S],
        interval: timedelta,
        trigger: ScheduleTrigger,
        batch: int = 100,
    ) -> None:
        self.engine = engine
        self.trigger = trigger  #: how a due schedule starts its run (the Workflow's API)
        self.interval = interval.total_seconds()
        self.batch = batch
        self.name = f"{engine.name}/poller"
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self.fired = 0  #: timeouts fired by this process (tests, metrics)
        engine.clock.on_change(self.wake)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def stopping(self) -> bool:
        """Whether ``stop()`` was called (a supervisor then lets the loop end)."""
        return self._stopping.is_set()

    def wake(self) -> None:
        """Look for due work now (the clock jumped); safe from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    _loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        delay = 0.05
        failing = False
        while not self._stopping.is_set():
            try:
                busy = await self.tick()
                if failing:
                    logger.info("%s: recovered", self.name)
                failing = False
                delay = 0.05
            except (psycopg.OperationalError, OSError) as exc:
                if not failing:
                    logger.warning("%s: database unavailable (%s); retrying", self.name, exc)
                failing = True
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception:
                logger.exception("%s: tick failed; retrying", self.name)
                busy = False
            if not busy:
                await self._sleep(self.interval)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def tick(self) -> bool:
        """One pass over all timer work; True when a full batch suggests more is due."""
        engine, name, batch = self.engine, self.name, self.batch
        pool = await engine.pool()
        busy = False
        async with pool.connection() as conn:
            claimed, fired = await fire_timeouts(engine, conn, name, batch)
            self.fired += fired
            counts = [claimed]
            schedules = functools.partial(fire_schedules, trigger=self.trigger)
            for job in (emit_retries, resume_paused, schedules, erase):
                counts.append(await job(engine, conn, name, batch))
            busy = any(count >= batch for count in counts)
        return busy
