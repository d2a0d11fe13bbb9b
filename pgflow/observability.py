"""Tracing and metrics hooks (OpenTelemetry).

The engine calls only the functions below. They cost nothing when tracing/metrics are
not configured. (Interface fixed; implementation filled in by the observability work.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "connector_span",
    "current_traceparent",
    "metrics",
    "step_span",
    "trigger_span",
]


@contextlib.contextmanager
def trigger_span(
    workflow: str, foreign_id: str, attributes: Mapping[str, Any] | None = None
) -> Iterator[str | None]:
    """Span around ``trigger``; yields the W3C ``traceparent`` to store on the run's
    first event and record (None when tracing is off)."""
    yield None


@contextlib.contextmanager
def step_span(
    name: str, traceparent: str | None, attributes: Mapping[str, Any] | None = None
) -> Iterator[str | None]:
    """Span for a consumer handling one event, continuing the event's stored context.

    Yields the traceparent of this span, to store on the events this step writes, so
    the next step is its child (one run = one trace). Exceptions raised inside are
    recorded on the span and re-raised.
    """
    yield traceparent


@contextlib.contextmanager
def connector_span(
    connector: str, event_id: str, attributes: Mapping[str, Any] | None = None
) -> Iterator[str | None]:
    """Span for a connector function handling one outside event; yields its traceparent."""
    yield None


def current_traceparent() -> str | None:
    """The traceparent of the active span, if tracing is on and a span is active."""
    return None


class Metrics:
    """Counters and gauges per consumer and shard (no-ops until configured)."""

    def batch(self, consumer: str, shard: int, events: int, seconds: float) -> None: ...

    def success(self, consumer: str, shard: int, count: int = 1) -> None: ...

    def error(self, consumer: str, shard: int) -> None: ...

    def retry(self, consumer: str, shard: int) -> None: ...

    def dead_letter(self, consumer: str, shard: int) -> None: ...

    def lag(self, consumer: str, shard: int, events: int, seconds: float) -> None: ...

    def horizon_age(self, seconds: float) -> None: ...

    def lag_alert(self, consumer: str, shard: int, seconds: float) -> None: ...


metrics = Metrics()
