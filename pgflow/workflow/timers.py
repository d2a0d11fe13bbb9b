"""Ready-made ``timer`` functions for :meth:`pgflow.Builder.add_timeout`.

A timer is ``timer(run, now) -> datetime | None``: when the run's timeout is due (None:
no timeout for this run). ``now`` comes from the workflow's clock (``build(clock=)``),
so these helpers follow a test clock too. luno has ``DurationTimerFunc`` and
``TimeTimerFunc``; :func:`daily_at` ("at 09:00 in Amsterdam") is the one people write
by hand and get wrong around midnight and daylight-saving changes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Any

__all__ = ["Timer", "after", "at", "daily_at"]

#: ``timer(run, now) -> datetime | None``
Timer = Callable[[Any, datetime], datetime | None]


def after(duration: timedelta | float) -> Timer:
    """Due ``duration`` (a timedelta, or seconds) after the run reached the status
    (luno ``DurationTimerFunc``)."""
    delta = duration if isinstance(duration, timedelta) else timedelta(seconds=duration)
    if delta < timedelta(0):
        raise ValueError(f"after: duration must not be negative, got {duration!r}")

    def timer(run: Any, now: datetime) -> datetime:
        return now + delta

    timer.__name__ = f"after({delta})"
    return timer


def at(when: datetime) -> Timer:
    """Due at the fixed moment ``when`` (luno ``TimeTimerFunc``; naive = UTC)."""
    due = when if when.tzinfo is not None else when.replace(tzinfo=UTC)

    def timer(run: Any, now: datetime) -> datetime:
        return due

    timer.__name__ = f"at({due.isoformat()})"
    return timer


def daily_at(time_of_day: time, tz: tzinfo | str = UTC) -> Timer:
    """Due at the next ``time_of_day`` in ``tz`` (a tzinfo or an IANA name such as
    ``"Europe/Amsterdam"``) strictly after the run reached the status: a run reaching
    the status at 09:30 with ``daily_at(time(9))`` is due tomorrow at 09:00. Wall-clock
    time: across a daylight-saving change it is still 09:00 local."""
    if isinstance(tz, str):
        from zoneinfo import ZoneInfo

        tz = ZoneInfo(tz)
    zone = tz
    wall = time_of_day.replace(tzinfo=None)

    def timer(run: Any, now: datetime) -> datetime:
        local = now.astimezone(zone)
        due = datetime.combine(local.date(), wall, tzinfo=zone)
        if due <= local:
            due = datetime.combine(local.date() + timedelta(days=1), wall, tzinfo=zone)
        return due

    timer.__name__ = f"daily_at({wall.isoformat()}, {zone})"
    return timer
