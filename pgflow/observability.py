"""Tracing and metrics hooks (OpenTelemetry).

The engine calls only the hooks below (:func:`trigger_span`, :func:`step_span`,
:func:`connector_span`, :func:`current_traceparent`, :data:`metrics`).

**Off unless configured, and then nearly free.** Each hook first reads one module-level
variable; when tracing is off it returns a shared :func:`contextlib.nullcontext` — no
span, context or attribute objects are built. Tracing turns on when:

* :func:`configure` is called with a provider (tests, apps that own their SDK setup), or
* on first use, the application has already installed a global ``TracerProvider`` /
  ``MeterProvider`` (pgflow then reports into it), or
* the standard ``OTEL_*`` variables ask for it: ``OTEL_TRACES_EXPORTER`` /
  ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``, ``none``) or an
  ``OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_ENDPOINT``; the protocol comes from
  ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the default, or ``grpc``), the
  service name from ``OTEL_SERVICE_NAME`` (default ``pgflow``). ``OTEL_SDK_DISABLED=true``
  wins over everything. The OTLP exporters come from the ``otlp`` extra and are imported
  only when asked for.

**One run, one trace.** ``trigger`` opens a PRODUCER span and stores its W3C
``traceparent`` on the run's first event and on the record. Every consumer handling an
event opens a CONSUMER span whose parent is the traceparent stored on that event, and
stores its own traceparent on the events it writes, so the trace reads
trigger → step → step → complete even though each step may run in another process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
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

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.metrics import (
        CallbackOptions,
        Counter,
        Histogram,
        Meter,
        MeterProvider,
        Observation,
    )
    from opentelemetry.trace import Tracer, TracerProvider
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

__all__ = [
    "ConsumerLag",
    "Metrics",
    "annotate",
    "configure",
    "connector_span",
    "current_traceparent",
    "disable",
    "flush",
    "format_traceparent",
    "metrics",
    "parse_traceparent",
    "reset",
    "sample_database",
    "sample_forever",
    "step_span",
    "tracing_enabled",
    "trigger_span",
]

logger = logging.getLogger("pgflow.observability")

INSTRUMENTATION_NAME = "pgflow"
DEFAULT_SERVICE_NAME = "pgflow"
MESSAGING_SYSTEM = "pgflow"

# --------------------------------------------------------------------------- state
# The hot-path check: hooks read ``_tracer`` and, until the first resolution, ``_resolved``.
_tracer: Tracer | None = None
_resolved = False
_resolve_lock = threading.Lock()
# Providers pgflow created from OTEL_* (flushed/shut down by :func:`reset`), and the
# ones it shut down: those may still be the process-global provider (it can be set only
# once) but must not be picked up again as "the application's provider".
_owned: list[Any] = []
_retired: list[Any] = []

_NULL: AbstractContextManager[None] = contextlib.nullcontext()


def _ensure_resolved() -> None:
    """Decide once, on first use, whether tracing/metrics are on (see module doc)."""
    global _resolved
    with _resolve_lock:
        if _resolved:
            return
        tp = _tracer_provider_from_environment()
        mp = _meter_provider_from_environment()
        _install(tp, mp)
        _resolved = True


def configure(
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> None:
    """Point pgflow's spans and metrics at explicit providers.

    A provider left as ``None`` is resolved as on first use: the application's global
    provider if one is installed, else the ``OTEL_*`` environment, else off. Call
    :func:`reset` to turn everything off again (tests).
    """
    global _resolved
    with _resolve_lock:
        tp = tracer_provider if tracer_provider is not None else _tracer_provider_from_environment()
        mp = meter_provider if meter_provider is not None else _meter_provider_from_environment()
        _install(tp, mp)
        _resolved = True


def reset(*, shutdown: bool = True) -> None:
    """Turn tracing and metrics off and forget registered lag alerts; the next hook call
    resolves the configuration again (tests).

    Providers pgflow created from the environment are flushed and shut down; providers
    passed to :func:`configure` belong to the caller and are left alone.
    """
    global _tracer, _resolved
    with _resolve_lock:
        _tracer = None
        metrics._install(None)
        metrics._thresholds.clear()
        owned, _owned[:] = list(_owned), []
        _retired.extend(owned)
        _resolved = False
    if shutdown:
        for provider in owned:
            with contextlib.suppress(Exception):
                provider.shutdown()


def disable() -> None:
    """Turn tracing and metrics off until :func:`configure` or :func:`reset` is called,
    whatever the environment or global providers say (benchmarks, tests)."""
    global _tracer, _resolved
    with _resolve_lock:
        _tracer = None
        metrics._install(None)
        _resolved = True


def flush(timeout_millis: int = 5000) -> None:
    """Export buffered spans/metrics now (e.g. before a short-lived process exits)."""
    for provider in list(_owned):
        with contextlib.suppress(Exception):
            provider.force_flush(timeout_millis)


def tracing_enabled() -> bool:
    """True when spans are being recorded."""
    if not _resolved:
        _ensure_resolved()
    return _tracer is not None


def _install(tp: TracerProvider | None, mp: MeterProvider | None) -> None:
    global _tracer
    _tracer = tp.get_tracer(INSTRUMENTATION_NAME, _version()) if tp is not None else None
    metrics._install(mp.get_meter(INSTRUMENTATION_NAME, _version()) if mp is not None else None)


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------- env resolution
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _exporters_wanted(signal: str) -> list[str]:
    """Exporter names for ``traces``/``metrics`` from ``OTEL_<SIGNAL>_EXPORTER``.

    Unlike the SDK's auto-instrumentation (default ``otlp``), pgflow exports nothing
    unless asked: an unset variable means ``otlp`` only when an OTLP endpoint is set.
    """
    raw = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if raw:
        names = [n.strip() for n in raw.split(",") if n.strip()]
        return [] if "none" in names else names
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
    ):
        return ["otlp"]
    return []


def _protocol(signal: str) -> str:
    return (
        (
            os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        .strip()
        .lower()
    )


def _resource() -> Any:
    from opentelemetry.sdk.resources import Resource

    name = os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    return Resource.create({"service.name": name})


def _global_tracer_provider() -> TracerProvider | None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    if any(provider is old for old in _retired):
        return None
    return provider


def _global_meter_provider() -> MeterProvider | None:
    from opentelemetry import metrics as otel_metrics

    provider = otel_metrics.get_meter_provider()
    try:
        from opentelemetry.metrics._internal import _ProxyMeterProvider
    except ImportError:  # pragma: no cover - private name moved
        proxy: tuple[type, ...] = (otel_metrics.NoOpMeterProvider,)
    else:
        proxy = (otel_metrics.NoOpMeterProvider, _ProxyMeterProvider)
    if isinstance(provider, proxy) or any(provider is old for old in _retired):
        return None
    return provider


def _meter_global_unset() -> bool:
    from opentelemetry import metrics as otel_metrics

    try:
        from opentelemetry.metrics._internal import _ProxyMeterProvider
    except ImportError:  # pragma: no cover - private name moved
        return False
    return isinstance(otel_metrics.get_meter_provider(), _ProxyMeterProvider)


def _tracer_provider_from_environment() -> TracerProvider | None:
    if _env_true("OTEL_SDK_DISABLED"):
        return None
    existing = _global_tracer_provider()
    if existing is not None:
        return existing
    names = _exporters_wanted("traces")
    if not names:
        return None
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = []
    for name in names:
        try:
            exporters.append(_span_exporter(name))
        except Exception as exc:  # a bad setting must not break the workflow itself
            logger.error("tracing disabled: cannot create span exporter %r (%s)", name, exc)
            return None
    provider = SdkTracerProvider(resource=_resource())
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    # The app had no provider: make ours global so spans the app opens inside steps
    # (HTTP clients, DB instrumentation) join the run's trace. (Only once per process:
    # the SDK refuses to replace a global provider.)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    _owned.append(provider)
    return provider


def _span_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"unsupported OTEL_TRACES_EXPORTER {name!r} (use otlp, console, none)")
    protocol = _protocol("traces")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            return GrpcSpanExporter()
        if protocol in ("http/protobuf", "http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpSpanExporter,
            )

            return HttpSpanExporter()
    except ImportError as exc:
        raise ImportError(f"{exc}; install the extra: pip install 'pgflow-engine[otlp]'") from exc
    raise ValueError(f"unsupported OTLP protocol {protocol!r} (use http/protobuf or grpc)")


def _meter_provider_from_environment() -> MeterProvider | None:
    if _env_true("OTEL_SDK_DISABLED"):
        return None
    existing = _global_meter_provider()
    if existing is not None:
        return existing
    names = _exporters_wanted("metrics")
    if not names:
        return None
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    readers = []
    for name in names:
        try:
            readers.append(PeriodicExportingMetricReader(_metric_exporter(name)))
        except Exception as exc:
            logger.error("metrics disabled: cannot create metric exporter %r (%s)", name, exc)
            return None
    provider = SdkMeterProvider(metric_readers=readers, resource=_resource())
    if _meter_global_unset():
        otel_metrics.set_meter_provider(provider)
    _owned.append(provider)
    return provider


def _metric_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if name != "otlp":
        raise ValueError(f"unsupported OTEL_METRICS_EXPORTER {name!r} (use otlp, console, none)")
    protocol = _protocol("metrics")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )

            return GrpcMetricExporter()
        if protocol in ("http/protobuf", "http"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetricExporter,
            )

            return HttpMetricExporter()
    except ImportError as exc:
        raise ImportError(f"{exc}; install the extra: pip install 'pgflow-engine[otlp]'") from exc
    raise ValueError(f"unsupported OTLP protocol {protocol!r} (use http/protobuf or grpc)")


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
    if _tracer is None:
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
    if _tracer is None:
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
        tracer = _tracer
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
                if isinstance(exc, Exception):
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
    if _tracer is None:
        if _resolved:
            return _NULL
        _ensure_resolved()
        if _tracer is None:
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
    if _tracer is None:
        if _resolved:
            return contextlib.nullcontext(traceparent)
        _ensure_resolved()
        if _tracer is None:
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
    if _tracer is None:
        if _resolved:
            return _NULL
        _ensure_resolved()
        if _tracer is None:
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


# ---------------------------------------------------------------------- metrics
#: Seconds without any lag_alert report after which the next one counts as a new crossing.
LAG_ALERT_REARM = 60.0

#: Histogram buckets for batch processing time, in seconds (1 ms .. 1 min).
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


@dataclass(slots=True)
class _Instruments:
    duration: Histogram
    events: Counter
    successes: Counter
    errors: Counter
    retries: Counter
    dead_letters: Counter
    lag_alerts: Counter
    # Observable gauges keep references so they are not collected.
    gauges: tuple[Any, ...]


class Metrics:
    """Counters and gauges per consumer and shard (no-ops until configured).

    Instruments (attributes ``pgflow.consumer``, ``pgflow.shard``):

    ======================================  =========  ==================================
    ``pgflow.consumer.lag``                 {event}    events after the cursor (gauge)
    ``pgflow.consumer.lag_time``            s          age of the oldest of them (gauge)
    ``pgflow.consumer.duration``            s          time to process a batch (histogram)
    ``pgflow.consumer.events``              {event}    events processed (counter)
    ``pgflow.consumer.successes``           {event}    handled successfully (counter)
    ``pgflow.consumer.errors``              {error}    handler failures (counter)
    ``pgflow.consumer.retries``             {retry}    retries scheduled (counter)
    ``pgflow.consumer.dead_letters``        {event}    events dead-lettered (counter)
    ``pgflow.consumer.lag_alerts``          {alert}    lag crossed ``lag_alert`` (counter)
    ``pgflow.horizon.age``                  s          oldest xid-holding transaction (gauge)
    ======================================  =========  ==================================
    """

    def __init__(self) -> None:
        self._inst: _Instruments | None = None
        self._lag: dict[tuple[str, int], tuple[int, float]] = {}
        self._horizon: float | None = None
        # (consumer, shard) -> monotonic time of the last lag_alert call while alerting
        self._alerting: dict[tuple[str, int], float] = {}
        self._thresholds: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- configuration
    @property
    def enabled(self) -> bool:
        if not _resolved:
            _ensure_resolved()
        return self._inst is not None

    def _install(self, meter: Meter | None) -> None:
        self._lag.clear()
        self._horizon = None
        self._alerting.clear()
        if meter is None:
            self._inst = None
            return
        gauges = (
            meter.create_observable_gauge(
                "pgflow.consumer.lag",
                callbacks=[self._observe_lag_events],
                unit="{event}",
                description="Events after the consumer's cursor, not processed yet",
            ),
            meter.create_observable_gauge(
                "pgflow.consumer.lag_time",
                callbacks=[self._observe_lag_seconds],
                unit="s",
                description="Age of the oldest event not processed yet by the consumer",
            ),
            meter.create_observable_gauge(
                "pgflow.horizon.age",
                callbacks=[self._observe_horizon],
                unit="s",
                description="Age of the oldest open transaction holding an xid: it "
                "holds back delivery for every reader in the cluster",
            ),
        )
        self._inst = _Instruments(
            duration=meter.create_histogram(
                "pgflow.consumer.duration",
                unit="s",
                description="Time to process one batch (handlers + commit)",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            ),
            events=meter.create_counter(
                "pgflow.consumer.events", unit="{event}", description="Events processed"
            ),
            successes=meter.create_counter(
                "pgflow.consumer.successes",
                unit="{event}",
                description="Events handled successfully",
            ),
            errors=meter.create_counter(
                "pgflow.consumer.errors", unit="{error}", description="Handler failures"
            ),
            retries=meter.create_counter(
                "pgflow.consumer.retries", unit="{retry}", description="Retries scheduled"
            ),
            dead_letters=meter.create_counter(
                "pgflow.consumer.dead_letters",
                unit="{event}",
                description="Events moved to pgflow.dead_letters",
            ),
            lag_alerts=meter.create_counter(
                "pgflow.consumer.lag_alerts",
                unit="{alert}",
                description="Times a consumer's lag crossed its lag_alert threshold",
            ),
            gauges=gauges,
        )

    # -- observable gauge callbacks (run by the SDK at collection time)
    def _observe_lag_events(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        with self._lock:
            items = list(self._lag.items())
        return [Observation(ev, _labels(c, s)) for (c, s), (ev, _) in items]

    def _observe_lag_seconds(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        with self._lock:
            items = list(self._lag.items())
        return [Observation(sec, _labels(c, s)) for (c, s), (_, sec) in items]

    def _observe_horizon(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        horizon = self._horizon
        return [] if horizon is None else [Observation(horizon)]

    # -- the hooks the engine calls
    def batch(self, consumer: str, shard: int, events: int, seconds: float) -> None:
        """A batch of ``events`` was processed in ``seconds`` (committed or not)."""
        inst = self._inst
        if inst is None:
            if _resolved:
                return
            _ensure_resolved()
            if (inst := self._inst) is None:
                return
        labels = _labels(consumer, shard)
        inst.duration.record(seconds, labels)
        if events:
            inst.events.add(events, labels)

    def success(self, consumer: str, shard: int, count: int = 1) -> None:
        inst = self._inst
        if inst is None:
            if _resolved:
                return
            _ensure_resolved()
            if (inst := self._inst) is None:
                return
        inst.successes.add(count, _labels(consumer, shard))

    def error(self, consumer: str, shard: int) -> None:
        inst = self._inst
        if inst is None:
            if _resolved:
                return
            _ensure_resolved()
            if (inst := self._inst) is None:
                return
        inst.errors.add(1, _labels(consumer, shard))

    def retry(self, consumer: str, shard: int) -> None:
        inst = self._inst
        if inst is None:
            if _resolved:
                return
            _ensure_resolved()
            if (inst := self._inst) is None:
                return
        inst.retries.add(1, _labels(consumer, shard))

    def dead_letter(self, consumer: str, shard: int) -> None:
        inst = self._inst
        if inst is None:
            if _resolved:
                return
            _ensure_resolved()
            if (inst := self._inst) is None:
                return
        inst.dead_letters.add(1, _labels(consumer, shard))

    def lag(self, consumer: str, shard: int, events: int, seconds: float) -> None:
        """The consumer's current lag; also clears a raised lag alert once it recovers."""
        key = (consumer, shard)
        if self._alerting and key in self._alerting:
            threshold = self._thresholds.get(consumer)
            if events == 0 or (threshold is not None and seconds < threshold):
                del self._alerting[key]
                logger.info("consumer %s shard %d: lag back to %.1fs", consumer, shard, seconds)
        threshold = self._thresholds.get(consumer) if self._thresholds else None
        if threshold is not None and seconds >= threshold and events > 0:
            self.lag_alert(consumer, shard, seconds)
        if self._inst is None:
            if _resolved:
                return
            _ensure_resolved()
            if self._inst is None:
                return
        with self._lock:
            self._lag[key] = (int(events), float(seconds))

    def horizon_age(self, seconds: float) -> None:
        if self._inst is None:
            if _resolved:
                return
            _ensure_resolved()
            if self._inst is None:
                return
        self._horizon = float(seconds)

    def lag_alert(self, consumer: str, shard: int, seconds: float) -> None:
        """The consumer's lag crossed its ``lag_alert`` threshold.

        Counted and logged (WARNING) once per crossing: repeated calls while the lag
        stays high (the engine reports every late event) are ignored until the lag
        recovers — :meth:`lag` reports no events pending, or lag below the threshold
        registered with :meth:`set_lag_alert`, or no alert was reported for
        :data:`LAG_ALERT_REARM` seconds. The warning is logged even when metrics are off.
        """
        key = (consumer, shard)
        now = time.monotonic()
        last = self._alerting.get(key)
        self._alerting[key] = now
        if last is not None and now - last < LAG_ALERT_REARM:
            return
        threshold = self._thresholds.get(consumer)
        logger.warning(
            "consumer %s shard %d is lagging: oldest unprocessed event is %.1fs old%s",
            consumer,
            shard,
            seconds,
            f" (lag_alert {threshold:g}s)" if threshold is not None else "",
        )
        inst = self._inst
        if inst is None:
            if _resolved:
                return
            _ensure_resolved()
            if (inst := self._inst) is None:
                return
        inst.lag_alerts.add(1, _labels(consumer, shard))

    # -- helpers beyond the engine interface
    @property
    def has_lag_alerts(self) -> bool:
        """Whether any consumer registered a ``lag_alert`` threshold."""
        return bool(self._thresholds)

    def set_lag_alert(self, consumer: str, seconds: float | None) -> None:
        """Register ``consumer``'s ``lag_alert`` so :meth:`lag` / :func:`sample_database`
        detect crossings themselves (``None`` removes it)."""
        if seconds is None:
            self._thresholds.pop(consumer, None)
        else:
            self._thresholds[consumer] = float(seconds)

    def forget(self, consumer: str, shard: int) -> None:
        """Stop reporting lag for a consumer shard that no longer exists."""
        with self._lock:
            self._lag.pop((consumer, shard), None)
        self._alerting.pop((consumer, shard), None)


def _labels(consumer: str, shard: int) -> dict[str, Any]:
    return {"pgflow.consumer": consumer, "pgflow.shard": shard}


metrics = Metrics()


# ------------------------------------------------------------- database sampling
@dataclass(frozen=True, slots=True)
class ConsumerLag:
    """One row of ``pgflow.consumer_lag``."""

    consumer: str
    shard: int
    shard_count: int
    lag_events: int
    lag_seconds: float


_LAG_SQL = (
    "SELECT consumer, shard, shard_count, lag_events, lag_seconds"
    " FROM pgflow.consumer_lag ORDER BY consumer, shard"
)


async def sample_database(
    db: AsyncConnectionPool[Any] | AsyncConnection[Any], *, force: bool = False
) -> list[ConsumerLag]:
    """Read every consumer's lag (``pgflow.consumer_lag``) and the xid horizon age, and
    feed them to :data:`metrics` (gauges, lag-alert crossings).

    Meant to be called by a worker every few seconds (see :func:`sample_forever`).
    Without metrics and without registered lag alerts it does not touch the database
    (unless ``force``) and returns ``[]``.
    """
    if not (force or metrics.enabled or metrics._thresholds):
        return []
    from psycopg import AsyncConnection as _AsyncConnection

    from .streamer import horizon_age

    async def _read(conn: AsyncConnection[Any]) -> tuple[list[ConsumerLag], float]:
        cur = await conn.execute(_LAG_SQL)
        rows = [
            ConsumerLag(str(r[0]), int(r[1]), int(r[2]), int(r[3]), float(r[4]))
            for r in await cur.fetchall()
        ]
        return rows, await horizon_age(conn)

    if isinstance(db, _AsyncConnection):
        rows, horizon = await _read(db)
    else:
        async with db.connection() as conn:
            rows, horizon = await _read(conn)
    seen = set()
    for row in rows:
        seen.add((row.consumer, row.shard))
        metrics.lag(row.consumer, row.shard, row.lag_events, row.lag_seconds)
    with metrics._lock:
        stale = [key for key in metrics._lag if key not in seen]
    for consumer, shard in stale:
        metrics.forget(consumer, shard)
    metrics.horizon_age(horizon)
    return rows


async def sample_forever(
    db: AsyncConnectionPool[Any],
    interval: float = 10.0,
    *,
    sleep: Callable[[float], Awaitable[Any]] | None = None,
) -> None:
    """Call :func:`sample_database` every ``interval`` seconds until cancelled; database
    errors are logged (once per outage) and retried at the next tick."""
    import asyncio

    import psycopg

    pause = sleep or asyncio.sleep
    failing = False
    while True:
        try:
            await sample_database(db)
            if failing:
                logger.info("lag sampling recovered")
            failing = False
        except (psycopg.Error, OSError) as exc:
            if not failing:
                logger.warning("lag sampling failed (%s); will retry", exc)
            failing = True
        await pause(interval)
