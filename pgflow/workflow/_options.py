"""Consumer options (``parallel_count``, ``err_backoff``, ...) and their validation.

Options are accepted as keyword arguments on ``step``/``add_step``/``add_timeout``/
``add_connector`` and validated when the workflow is built, so every mistake in a graph
is reported at once by :class:`pgflow.BuildError` with the option and consumer named.
Durations may be given as ``timedelta`` or as seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Any

__all__ = ["OPTION_NAMES", "Options", "parse_options"]


@dataclass(frozen=True, slots=True)
class Options:
    """How one consumer runs. Defaults suit a small service; tune per step."""

    #: shards (and so concurrent batches) of this consumer; a run's events stay on one
    parallel_count: int = 1
    #: delay before the first retry of a failed step/connector event; doubles each time
    err_backoff: timedelta = timedelta(seconds=1)
    #: pause the run after this many consecutive step errors (None: retry forever)
    pause_after_err_count: int | None = 5
    #: the polling timer that backs up LISTEN/NOTIFY wake-ups (and the timer poller)
    polling_frequency: timedelta = timedelta(seconds=1)
    #: events per batch transaction (a batch holds a transaction open while it runs)
    batch_size: int = 100
    #: only process events at least this old (0: at once)
    consume_lag: timedelta = timedelta(0)
    #: warn (log + metric) when the event being processed is older than this
    lag_alert: timedelta | None = None
    #: connectors: attempts per event before it is dead-lettered
    max_retries: int = 5
    #: resume a run paused by ``pause_after_err_count`` after this long (None: stay
    #: paused until resumed by hand); luno ``WithPauseRetry``, same 1 h default
    pause_retry: timedelta | None = timedelta(hours=1)

    def backoff(self, attempt: int, cap: timedelta = timedelta(minutes=10)) -> timedelta:
        """Delay before retry number ``attempt`` (1-based): err_backoff * 2**(attempt-1)."""
        seconds = self.err_backoff.total_seconds() * (2 ** max(0, min(attempt - 1, 30)))
        return min(timedelta(seconds=seconds), cap)


OPTION_NAMES = frozenset(f.name for f in fields(Options))
_INTS = {"parallel_count", "batch_size", "pause_after_err_count", "max_retries"}
_DURATIONS = {"err_backoff", "polling_frequency", "consume_lag", "lag_alert", "pause_retry"}
_ZERO_OK = {"consume_lag"}
_NONE_OK = {"pause_after_err_count", "lag_alert", "pause_retry"}


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    raise TypeError


def parse_options(
    where: str, given: Mapping[str, Any], base: Options | None = None
) -> tuple[Options, list[str]]:
    """Options from keyword arguments, plus a list of problems (empty when valid)."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for name, value in given.items():
        if name not in OPTION_NAMES:
            problems.append(
                f"{where}: unknown option {name!r} (known: {', '.join(sorted(OPTION_NAMES))})"
            )
            continue
        if value is None:
            if name in _NONE_OK:
                values[name] = None
            else:
                problems.append(f"{where}: option {name} must not be None")
            continue
        if name in _INTS:
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{where}: option {name} must be an int, got {value!r}")
            elif value <= 0:
                problems.append(f"{where}: option {name} must be positive, got {value}")
            else:
                values[name] = value
        elif name in _DURATIONS:
            try:
                duration = _duration(value)
            except TypeError:
                problems.append(
                    f"{where}: option {name} must be a timedelta or seconds, got {value!r}"
                )
                continue
            if duration < timedelta(0) or (duration == timedelta(0) and name not in _ZERO_OK):
                problems.append(
                    f"{where}: option {name} must be "
                    f"{'zero or more' if name in _ZERO_OK else 'positive'}, got {value!r}"
                )
            else:
                values[name] = duration
    return replace(base or Options(), **values), problems
