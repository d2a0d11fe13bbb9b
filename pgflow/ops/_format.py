"""Durations as operators read them. One definition, so lag and ages read the same in
the CLI's tables and the web console."""

from __future__ import annotations

from datetime import timedelta

__all__ = ["format_interval"]


def format_interval(value: timedelta | float) -> str:
    """A duration as people read it: ``850ms``, ``4.2s``, ``2m 05s``, ``3h 07m``, ``2d 4h``."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s == 0:
        return "0s"
    if s < 1:
        return f"{sign}{s * 1000:.0f}ms"
    if s < 60:
        return f"{sign}{s:.1f}s".replace(".0s", "s")
    whole = int(s)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d {hours}h"
    if hours:
        return f"{sign}{hours}h {minutes:02d}m"
    return f"{sign}{minutes}m {secs:02d}s"
