"""Tracing and metrics hooks (OpenTelemetry).

The engine calls only the hooks below (:func:`trigger_span`, :func:`step_span`,
:func:`connector_span`, :func:`current_traceparent`, :data:`metrics`).

**Off unless configured, and then nearly free.** Each hook first reads one flag; when
tracing is off it returns a shared :func:`contextlib.nullcontext` — no span, context or
attribute objects are built. Tracing turns on when:

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

Layout: ``_state`` (the one mutable state object), ``_config`` (configure/reset and the
``OTEL_*`` resolution), ``_tracing`` (traceparent, span hooks), ``_metrics``
(:class:`Metrics`), ``_sampling`` (lag and horizon read from the database).
"""

from __future__ import annotations

from pgflow.observability._config import configure, disable, flush, reset, tracing_enabled
from pgflow.observability._metrics import LAG_ALERT_REARM as LAG_ALERT_REARM
from pgflow.observability._metrics import Metrics, metrics
from pgflow.observability._sampling import ConsumerLag, sample_database, sample_forever
from pgflow.observability._tracing import (
    annotate,
    connector_span,
    current_traceparent,
    format_traceparent,
    parse_traceparent,
    step_span,
    trigger_span,
)

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
