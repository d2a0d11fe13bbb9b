"""Where telemetry goes: explicit providers, the application's global ones, or OTEL_*.

:func:`configure`, :func:`reset`, :func:`disable` and :func:`flush` are the public
controls; :func:`resolve_once` is what the hooks call on first use. The environment is
read as described in the package doc; both signals (traces, metrics) go through one
parametrised path, :func:`_provider_from_environment`, and differ only in the
:class:`_Signal` table and in how their SDK provider is assembled.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry import trace

from pgflow.observability._metrics import metrics
from pgflow.observability._state import DEFAULT_SERVICE_NAME, INSTRUMENTATION_NAME, logger, state

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

P = TypeVar("P")


# ------------------------------------------------------------------ controls
def configure(
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> None:
    """Point pgflow's spans and metrics at explicit providers.

    A provider left as ``None`` is resolved as on first use: the application's global
    provider if one is installed, else the ``OTEL_*`` environment, else off. Call
    :func:`reset` to turn everything off again (tests).
    """
    with state.lock:
        tp = tracer_provider if tracer_provider is not None else _tracer_provider_from_environment()
        mp = meter_provider if meter_provider is not None else _meter_provider_from_environment()
        _install(tp, mp)
        state.resolved = True


def reset(*, shutdown: bool = True) -> None:
    """Turn tracing and metrics off and forget registered lag alerts; the next hook call
    resolves the configuration again (tests).

    Providers pgflow created from the environment are flushed and shut down; providers
    passed to :func:`configure` belong to the caller and are left alone.
    """
    with state.lock:
        state.tracer = None
        metrics._install(None)
        metrics._thresholds.clear()
        owned, state.owned[:] = list(state.owned), []
        state.retired.extend(owned)
        state.resolved = False
    if shutdown:
        for provider in owned:
            with contextlib.suppress(Exception):
                provider.shutdown()


def disable() -> None:
    """Turn tracing and metrics off until :func:`configure` or :func:`reset` is called,
    whatever the environment or global providers say (benchmarks, tests)."""
    with state.lock:
        state.tracer = None
        metrics._install(None)
        state.resolved = True


def flush(timeout_millis: int = 5000) -> None:
    """Export buffered spans/metrics now (e.g. before a short-lived process exits)."""
    for provider in list(state.owned):
        with contextlib.suppress(Exception):
            provider.force_flush(timeout_millis)


def tracing_enabled() -> bool:
    """True when spans are being recorded."""
    if not state.resolved:
        resolve_once()
    return state.tracer is not None


def resolve_once() -> None:
    """Decide, the first time any hook runs, whether tracing/metrics are on."""
    with state.lock:
        if state.resolved:
            return
        _install(_tracer_provider_from_environment(), _meter_provider_from_environment())
        state.resolved = True


state.resolver = resolve_once


def _install(tp: TracerProvider | None, mp: MeterProvider | None) -> None:
    state.tracer = tp.get_tracer(INSTRUMENTATION_NAME, _version()) if tp is not None else None
    metrics._install(mp.get_meter(INSTRUMENTATION_NAME, _version()) if mp is not None else None)


def _version() -> str:
    from pgflow._version import __version__

    return __version__


# ------------------------------------------------------------ the two signals
@dataclass(frozen=True, slots=True)
class _Signal:
    """What differs between traces and metrics when read from OTEL_* variables."""

    name: str  # "traces" | "metrics": OTEL_<NAME>_EXPORTER, OTEL_EXPORTER_OTLP_<NAME>_*
    feature: str  # for the log line: "<feature> disabled: cannot create <item> exporter"
    item: str
    # (module, class) of each exporter; the OTLP ones come from the ``otlp`` extra
    console: tuple[str, str]
    otlp_grpc: tuple[str, str]
    otlp_http: tuple[str, str]


_TRACES = _Signal(
    "traces",
    "tracing",
    "span",
    console=("opentelemetry.sdk.trace.export", "ConsoleSpanExporter"),
    otlp_grpc=("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "OTLPSpanExporter"),
    otlp_http=("opentelemetry.exporter.otlp.proto.http.trace_exporter", "OTLPSpanExporter"),
)
_METRICS = _Signal(
    "metrics",
    "metrics",
    "metric",
    console=("opentelemetry.sdk.metrics.export", "ConsoleMetricExporter"),
    otlp_grpc=("opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "OTLPMetricExporter"),
    otlp_http=("opentelemetry.exporter.otlp.proto.http.metric_exporter", "OTLPMetricExporter"),
)


def _tracer_provider_from_environment() -> TracerProvider | None:
    return _provider_from_environment(
        _TRACES, _global_tracer_provider, _span_exporter, _new_tracer_provider
    )


def _meter_provider_from_environment() -> MeterProvider | None:
    return _provider_from_environment(
        _METRICS, _global_meter_provider, _metric_reader, _new_meter_provider
    )


def _provider_from_environment(
    signal: _Signal,
    global_provider: Callable[[], P | None],
    part: Callable[[str], Any],
    new_provider: Callable[[list[Any]], P],
) -> P | None:
    """The provider for ``signal``: the application's global one, else one pgflow builds
    (and owns) from the ``OTEL_*`` exporter settings, else None (off).

    ``part`` makes what the provider is assembled from for one exporter name (an
    exporter, or a metric reader around one); ``new_provider`` assembles it.
    """
    if _env_true("OTEL_SDK_DISABLED"):
        return None
    existing = global_provider()
    if existing is not None:
        return existing
    names = _exporters_wanted(signal.name)
    if not names:
        return None
    parts = []
    for name in names:
        try:
            parts.append(part(name))
        except Exception as exc:  # a bad setting must not break the workflow itself
            logger.error(
                "%s disabled: cannot create %s exporter %r (%s)",
                signal.feature,
                signal.item,
                name,
                exc,
            )
            return None
    provider = new_provider(parts)
    state.owned.append(provider)
    return provider


def _new_tracer_provider(exporters: list[Any]) -> TracerProvider:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = SdkTracerProvider(resource=_resource())
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    # The app had no provider: make ours global so spans the app opens inside steps
    # (HTTP clients, DB instrumentation) join the run's trace. (Only once per process:
    # the SDK refuses to replace a global provider.)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    return provider


def _new_meter_provider(readers: list[Any]) -> MeterProvider:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

    provider = SdkMeterProvider(metric_readers=readers, resource=_resource())
    if _meter_global_unset():
        otel_metrics.set_meter_provider(provider)
    return provider


def _span_exporter(name: str) -> Any:
    return _exporter(_TRACES, name)


def _metric_reader(name: str) -> Any:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    return PeriodicExportingMetricReader(_exporter(_METRICS, name))


def _exporter(signal: _Signal, name: str) -> Any:
    """A new exporter for ``signal`` named by ``OTEL_<SIGNAL>_EXPORTER`` (one entry)."""
    if name == "console":
        return _new(signal.console)
    if name != "otlp":
        raise ValueError(
            f"unsupported OTEL_{signal.name.upper()}_EXPORTER {name!r} (use otlp, console, none)"
        )
    protocol = _protocol(signal.name)
    if protocol == "grpc":
        target = signal.otlp_grpc
    elif protocol in ("http/protobuf", "http"):
        target = signal.otlp_http
    else:
        raise ValueError(f"unsupported OTLP protocol {protocol!r} (use http/protobuf or grpc)")
    try:
        return _new(target)
    except ImportError as exc:
        raise ImportError(f"{exc}; install the extra: pip install 'pgflow-engine[otlp]'") from exc


def _new(target: tuple[str, str]) -> Any:
    module, name = target
    return getattr(importlib.import_module(module), name)()


# ------------------------------------------------------------- OTEL_* reading
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


# ------------------------------------------------- the application's providers
def _global_tracer_provider() -> TracerProvider | None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    if any(provider is old for old in state.retired):
        return None
    return provider


def _global_meter_provider() -> MeterProvider | None:
    from opentelemetry import metrics as otel_metrics

    provider = otel_metrics.get_meter_provider()
    if isinstance(provider, otel_metrics.NoOpMeterProvider) or _is_meter_proxy(provider):
        return None
    if any(provider is old for old in state.retired):
        return None
    return provider


def _meter_global_unset() -> bool:
    from opentelemetry import metrics as otel_metrics

    return _is_meter_proxy(otel_metrics.get_meter_provider())


def _is_meter_proxy(provider: object) -> bool:
    """Whether ``provider`` is the SDK's placeholder for "no global MeterProvider yet"."""
    try:
        from opentelemetry.metrics._internal import _ProxyMeterProvider
    except ImportError:  # pragma: no cover - private name moved
        return False
    return isinstance(provider, _ProxyMeterProvider)
