"""Spans: W3C ``traceparent`` handling and the span hooks the engine calls.

**Off, nearly free.** Each hook first reads ``state.tracer`` (and, until the first
resolution, ``state.resolved``); while tracing is off it returns a shared
:func:`contextlib.nullcontext` — no span, context or attribute objects are built.

**One run, one trace.** ``trigger`` opens a PRODUCER span and stores its traceparent on
the run's first event and record; each consumer opens a CONSUMER span whose parent is
the traceparent stored on the event it handles, and stores its own on the events it
writes (see the package doc).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any
from uuid import UUID

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from pgflow.observability._state import MESSAGING_SYSTEM, ensure_resolved, state

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.trace import Tracer

_NULL: AbstractContextManager[None] = contextlib.nullcontext()


def _resolved_tracer() -> Tracer | None:
    """Slow path of the hooks, until the configuration is resolved: resolve it."""
    ensure_resolved()
    return state.tracer


# ------------------------------------------------------------------ traceparent
def format_traceparent(ctx: SpanContext) -> str | None:
    """The W3C ``traceparent`` header value of ``ctx`` (None for an invalid context)."""
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse_traceparent(value: str | None) -> SpanContext | None:
    """Parse a stored W3C ``traceparent``; None when absent or malformed (never raises:
    a damaged header must not stop a run, it only starts a new trace)."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4:
        return None
    version, trace_hex, span_hex, flags_hex = parts[0], parts[1], parts[2], parts[3]
    if len(version) != 2 or version == "ff" or len(trace_hex) != 32 or len(span_hex) != 16:
        return None
    if len(flags_hex) != 2 or (version == "00" and len(parts) != 4):
        return None
    try:
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0xFF))


def _context_from(traceparent: str | None) -> otel_context.Context | None:
    span_context = parse_traceparent(traceparent)
    if span_context is None:
        return None
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def current_traceparent() -> str | None:
    """The traceparent of the active span, if tracing is on and a span is active."""
    if state.tracer is None:
        return None
    return format_traceparent(trace.get_current_span().get_span_context())


# ------------------------------------------------------------------ attributes
# Short keys the engine may pass, mapped to messaging-style attribute names. Keys that
# already contain a dot are used as they are.
_ATTRIBUTE_NAMES: dict[str, tuple[str, ...]] = {
    "workflow": ("pgflow.workflow", "messaging.destination.name"),
    "status": ("pgflow.status",),
    "from_status": ("pgflow.from_status",),
    "to_status": ("pgflow.to_status",),
    "foreign_id": ("pgflow.foreign_id",),
    "run_id": ("pgflow.run_id",),
    "run_state": ("pgflow.run_state",),
    "consumer": ("pgflow.consumer",),
    "shard": ("pgflow.shard",),
    "shard_count": ("pgflow.shard_count",),
    "batch_size": ("messaging.batch.message_count",),
    "event_id": ("messaging.message.id",),
    "event_type": ("pgflow.event_type",),
    "version": ("pgflow.version",),
    "connector": ("pgflow.connector",),
    "attempt": ("pgflow.attempt",),
}


def _attr_value(value: Any) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, UUID):
        return str(value)
    name = getattr(value, "name", None)  # enum members: the status name reads best
    if isinstance(name, str) and hasattr(type(value), "__members__"):
        return name
    if isinstance(value, list | tuple) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    return str(value)


def _attributes(base: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra:
        for key, value in extra.items():
            if value is None or key == "traceparent":
                continue
            converted = _attr_value(value)
            for name in _ATTRIBUTE_NAMES.get(key, (key if "." in key else f"pgflow.{key}",)):
                base[name] = converted
    return base


def annotate(attributes: Mapping[str, Any]) -> None:
    """Add attributes to the active span (e.g. the run id once ``trigger`` knows it)."""
    if state.tracer is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(_attributes({}, attributes))


# ------------------------------------------------------------------------ spans
class _Span(AbstractContextManager["str | None"]):
    """One span, made current while the block runs; yields its traceparent.

    A plain class rather than ``tracer.start_as_current_span`` (three nested generator
    context managers): this sits on every step of every run, so it does the minimum —
    start, attach, detach, end — and records exceptions itself (status message names
    the error; cancellation is noted but is not an error of the run).
    """

    __slots__ = ("_attrs", "_kind", "_links", "_name", "_parent", "_span", "_token")

    def __init__(
        self,
        name: str,
        kind: SpanKind,
        parent: otel_context.Context | None,
        attributes: dict[str, Any],
        links: list[trace.Link] | None = None,
    ) -> None:
        self._name = name
        self._kind = kind
        self._parent = parent
        self._attrs = attributes
        self._links = links
        self._span: trace.Span | None = None
        self._token: object = None

    def __enter__(self) -> str | None:
        tracer = state.tracer
        if tracer is None:  # turned off since this was created
            return None
        span = tracer.start_span(
            self._name,
            context=self._parent,
            kind=self._kind,
            attributes=self._attrs,
            links=self._links,
        )
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))
        return format_traceparent(span.get_span_context())

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        span = self._span
        if span is None:
            return
        try:
            if exc is not None:
                if getattr(exc, "control_flow", False):
                    # an internal signal (fall back, retry the batch, stale run): the
                    # work is redone elsewhere, nothing failed
                    span.set_attribute("pgflow.control_flow", type(exc).__name__)
                elif isinstance(exc, Exception):
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                else:
                    span.set_attribute("pgflow.interrupted", type(exc).__name__)
        finally:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            span.end()


def trigger_span(
    workflow: str, foreign_id: str, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[str | None]:
    """Span around ``trigger``; yields the W3C ``traceparent`` to store on the run's
    first event and record (None when tracing is off).

    Kind PRODUCER, child of whatever span is current (e.g. the web request that
    triggered the run, or the connector event being handled).
    """
    if state.tracer is None and (state.resolved or _resolved_tracer() is None):
        return _NULL
    attrs = _attributes(
        {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "send",
            "messaging.destination.name": workflow,
            "pgflow.workflow": workflow,
            "pgflow.foreign_id": foreign_id,
        },
        attributes,
    )
    return _Span(f"trigger {workflow}", SpanKind.PRODUCER, None, attrs)


def step_span(
    name: str, traceparent: str | None, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[str | None]:
    """Span for a consumer handling one event, continuing the event's stored context.

    Yields the traceparent of this span, to store on the events this step writes, so
    the next step is its child (one run = one trace). Exceptions raised inside are
    recorded on the span and re-raised. When tracing is off it yields ``traceparent``
    unchanged, so a context stored by a traced process survives untraced ones.
    """
    if state.tracer is None and (state.resolved or _resolved_tracer() is None):
        return contextlib.nullcontext(traceparent)
    attrs = _attributes(
        {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "process",
        },
        attributes,
    )
    return _Span(f"process {name}", SpanKind.CONSUMER, _context_from(traceparent), attrs)


def connector_span(
    connector: str,
    event_id: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> AbstractContextManager[str | None]:
    """Span for a connector function handling one outside event; yields its traceparent.

    When the outside event carries a W3C ``traceparent`` (in ``headers``, or as
    ``attributes["traceparent"]``) the span continues that trace — one event is
    processed per span, so the sender's span is the natural parent — and also links to
    it. Otherwise it starts a new trace (or joins the current span, if any); the run
    this event triggers becomes part of it.
    """
    if state.tracer is None and (state.resolved or _resolved_tracer() is None):
        return _NULL
    upstream = (headers or {}).get("traceparent") or (attributes or {}).get("traceparent")
    parent = _context_from(upstream if isinstance(upstream, str) else None)
    links = None
    if parent is not None:
        links = [trace.Link(trace.get_current_span(parent).get_span_context())]
    attrs = _attributes(
        {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "receive",
            "messaging.message.id": event_id,
            "pgflow.connector": connector,
        },
        attributes,
    )
    return _Span(f"receive {connector}", SpanKind.CONSUMER, parent, attrs, links)
