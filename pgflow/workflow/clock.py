"""The clock that timeouts, step retries, pause retries and schedules read.

By default pgflow asks the *database* what time it is (``now()`` in the statement that
claims due work), so several worker hosts with drifting clocks still agree on what is
due. ``Builder.build(..., clock=...)`` swaps in another clock (luno ``WithClock``);
:class:`pgflow.testing.Clock` is one a test moves by hand, so a 3-day timeout fires in
milliseconds.

A clock whose :meth:`Clock.sql_now` returns None keeps the database's ``now()``; any
other value is passed to the statements instead (``coalesce(%s, now())``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["Clock", "SystemClock"]


class Clock:
    """What time it is for pgflow's time-driven work (see the module doc)."""

    def now(self) -> datetime:
        """The time given to ``timer(run, now)``/``expire(run, now)`` and cron."""
        raise NotImplementedError

    def sql_now(self) -> datetime | None:
        """The time due work is compared with in SQL; None: the database's ``now()``."""
        return self.now()

    def on_change(self, callback: Callable[[], None]) -> None:
        """Register ``callback`` to run when the time jumps (a test clock moved); the
        timer poller uses it to look at once instead of at its next poll."""


class SystemClock(Clock):
    """The real time; due work is judged by the database's clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sql_now(self) -> datetime | None:
        return None
