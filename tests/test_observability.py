"""Spans and metrics through the SDK's in-memory exporter and reader."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pgflow import observability as obs
from pgflow.log.cursors import CursorKey, ensure_cursor
from pgflow.log.events import NewEvent, append
from pgflow.log.streamer import Filter
from pgflow.observability import _config as obs_config
from pgflow.observability import _metrics as obs_metrics
from pgflow.observability import _state as obs_state
from pgflow.observability import _tracing as obs_tracing

OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in OTEL_VARS:
        monkeypatch.delenv(var, raising=False)
    # Never install a process-global provider from these tests (it can be set only once).
    monkeypatch.setattr(trace, "set_tracer_provider", lambda provider: None)
    obs.reset()
    yield
    obs.reset()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    obs.configure(tracer_provider=provider)
    exporter.provider = provider  # type: ignore[attr-defined]
    return exporter


@pytest.fixture
def reader() -> InMemoryMetricReader:
    reader = InMemoryMetricReader()
    obs.configure(meter_provider=MeterProvider(metric_readers=[reader]))
    return reader


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


# ------------------------------------------------------------------- off
def test_off_by_default_creates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(obs_config, "_global_tracer_provider", lambda: None)
    monkeypatch.setattr(obs_config, "_global_meter_provider", lambda: None)

    def no_spans(*a: Any, **k: Any) -> Any:
        raise AssertionError("a span was started while tracing is off")

    monkeypatch.setattr(obs_tracing, "_Span", no_spans)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with obs.trigger_span("orders", "o-1", {"run_id": "x"}) as got:
        assert got is None
    with obs.step_span("orders CREATED", tp) as got:
        assert got == tp  # a context stored by a traced process survives untraced ones
    with obs.connector_span("payments", "m-1") as got:
        assert got is None
    assert obs.current_traceparent() is None
    assert not obs.tracing_enabled() and not obs.metrics.enabled
    obs.metrics.batch("c", 0, 10, 0.1)  # all no-ops
    obs.metrics.success("c", 0)
    obs.metrics.lag("c", 0, 5, 1.0)
    assert obs.metrics._lag == {}
    # Off is decided once: later calls only read a module flag.
    assert obs_state.state.resolved and obs_state.state.tracer is None


def test_sdk_disabled_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not obs.tracing_enabled()


# ---------------------------------------------------------------- traces
def test_one_run_is_one_trace(spans: InMemorySpanExporter) -> None:
    with obs.trigger_span("orders", "order-1", {"run_id": "r-1", "status": "CREATED"}) as tp0:
        assert tp0 is not None and obs.current_traceparent() == tp0
    # Each step runs later, maybe elsewhere: only the stored traceparent links them.
    with obs.step_span("orders CREATED", tp0, {"consumer": "orders/CREATED", "shard": 1}) as tp1:
        pass
    with obs.step_span("orders PAID", tp1, {"workflow": "orders", "foreign_id": "order-1"}):
        pass
    got = by_name(spans)
    trigger, step1, step2 = (
        got["trigger orders"],
        got["process orders CREATED"],
        got["process orders PAID"],
    )
    assert trigger.kind is SpanKind.PRODUCER
    assert step1.kind is step2.kind is SpanKind.CONSUMER
    assert {trigger.context.trace_id, step1.context.trace_id, step2.context.trace_id} == {
        trigger.context.trace_id
    }
    assert trigger.parent is None
    assert step1.parent is not None and step1.parent.span_id == trigger.context.span_id
    assert step2.parent is not None and step2.parent.span_id == step1.context.span_id
    for tp, span in ((tp0, trigger), (tp1, step1)):
        ctx = span.context
        assert tp == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        assert ctx.trace_flags.sampled
    # messaging-style attributes
    assert trigger.attributes is not None and step1.attributes is not None
    assert trigger.attributes["messaging.system"] == "pgflow"
    assert trigger.attributes["messaging.operation.type"] == "send"
    assert trigger.attributes["messaging.destination.name"] == "orders"
    assert trigger.attributes["pgflow.foreign_id"] == "order-1"
    assert trigger.attributes["pgflow.run_id"] == "r-1"
    assert trigger.attributes["pgflow.status"] == "CREATED"
    assert step1.attributes["messaging.operation.type"] == "process"
    assert step1.attributes["pgflow.consumer"] == "orders/CREATED"
    assert step1.attributes["pgflow.shard"] == 1


def test_step_errors_are_recorded_and_reraised(spans: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError, match="card declined"), obs.step_span("orders CREATED", None):
        raise ValueError("card declined")
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError: card declined"
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"


def test_control_flow_signals_are_not_error_spans(spans: InMemorySpanExporter) -> None:
    """NeedsPerEventPath (an optimistic batch falls back) is no failure: no ERROR span."""
    from pgflow.workflow._batch_api import NeedsPerEventPath

    with pytest.raises(NeedsPerEventPath), obs.connector_span("payments", "e1"):
        raise NeedsPerEventPath("the connector function uses api.conn")
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is not StatusCode.ERROR
    assert not span.events
    assert span.attributes is not None
    assert span.attributes["pgflow.control_flow"] == "NeedsPerEventPath"


def test_trigger_joins_the_callers_trace(spans: InMemorySpanExporter) -> None:
    tracer = spans.provider.get_tracer("app")  # type: ignore[attr-defined]
    with tracer.start_as_current_span("POST /orders") as request, obs.trigger_span("orders", "o-1"):
        pass
    got = by_name(spans)
    trig = got["trigger orders"]
    assert trig.parent is not None and trig.parent.span_id == request.get_span_context().span_id


def test_damaged_traceparent_starts_a_new_trace(spans: InMemorySpanExporter) -> None:
    for bad in ("garbage", "00-xyz-abc-01", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", ""):
        with obs.step_span("s", bad) as tp:
            assert tp is not None and tp != bad
    assert all(s.parent is None for s in spans.get_finished_spans())


def test_traceparent_round_trip() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = obs.parse_traceparent(tp)
    assert ctx is not None and ctx.is_remote
    assert obs.format_traceparent(ctx) == tp
    assert obs.parse_traceparent("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") is None
    # future versions may append fields
    assert obs.parse_traceparent(tp.replace("00-", "01-", 1) + "-extra") is not None


def test_connector_span_continues_the_senders_trace(spans: InMemorySpanExporter) -> None:
    upstream = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with (
        obs.connector_span(
            "payments", "m-1", {"foreign_id": "o-1"}, headers={"traceparent": upstream}
        ) as tp,
        obs.trigger_span("orders", "o-1"),
    ):
        pass
    with obs.connector_span("payments", "m-2"):
        pass
    got = spans.get_finished_spans()
    first, trig, second = (
        next(s for s in got if s.name == "receive payments" and s.parent is not None),
        next(s for s in got if s.name == "trigger orders"),
        next(s for s in got if s.name == "receive payments" and s.parent is None),
    )
    assert first.kind is SpanKind.CONSUMER
    assert f"{first.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert first.parent is not None and f"{first.parent.span_id:016x}" == "b7ad6b7169203331"
    assert [f"{link.context.span_id:016x}" for link in first.links] == ["b7ad6b7169203331"]
    assert first.attributes is not None and first.attributes["messaging.message.id"] == "m-1"
    assert tp is not None and trig.parent is not None
    assert trig.parent.span_id == first.context.span_id  # the run's trace starts at the event
    assert second.links == ()


def test_annotate_adds_to_the_active_span(spans: InMemorySpanExporter) -> None:
    with obs.trigger_span("orders", "o-1"):
        obs.annotate({"run_id": "late-run-id"})
    (span,) = spans.get_finished_spans()
    assert span.attributes is not None and span.attributes["pgflow.run_id"] == "late-run-id"


# ------------------------------------------------------------ environment
def test_env_console_and_otlp_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(obs_config, "_global_tracer_provider", lambda: None)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-worker")
    assert obs.tracing_enabled()
    provider = obs_state.state.owned[0]
    assert provider.resource.attributes["service.name"] == "billing-worker"
    obs.reset()

    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    assert obs_config._exporters_wanted("traces") == ["otlp"]
    assert isinstance(obs_config._span_exporter("otlp"), HttpExporter)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert isinstance(obs_config._span_exporter("otlp"), GrpcExporter)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert obs_config._exporters_wanted("traces") == []


def test_bad_exporter_setting_disables_tracing_not_the_engine(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(obs_config, "_global_tracer_provider", lambda: None)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with (
        caplog.at_level(logging.ERROR, logger="pgflow.observability"),
        obs.trigger_span("orders", "o-1") as tp,
    ):
        assert tp is None
    assert "zipkin" in caplog.text


def test_an_apps_global_provider_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(obs_config, "_global_tracer_provider", lambda: provider)
    with obs.trigger_span("orders", "o-1") as tp:
        assert tp is not None
    assert [s.name for s in exporter.get_finished_spans()] == ["trigger orders"]
    assert obs_state.state.owned == []  # not ours: reset() must not shut it down


# ---------------------------------------------------------------- metrics
def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    data = reader.get_metrics_data()
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    value = getattr(p, "value", None)
                    if value is None:  # histogram
                        value = (p.count, p.sum)
                    out.setdefault(metric.name, []).append((dict(p.attributes), value))
    return out


def test_counters_histogram_and_gauges(reader: InMemoryMetricReader) -> None:
    m = obs.metrics
    m.batch("orders/CREATED", 0, 10, 0.05)
    m.batch("orders/CREATED", 0, 5, 0.02)
    m.batch("orders/CREATED", 1, 0, 0.001)
    m.success("orders/CREATED", 0, 14)
    m.error("orders/CREATED", 0)
    m.retry("orders/CREATED", 0)
    m.dead_letter("payments", 0)
    m.lag("orders/CREATED", 0, 42, 3.5)
    m.lag("orders/CREATED", 1, 0, 0.0)
    m.horizon_age(12.5)
    got = points(reader)
    s0 = {"pgflow.consumer": "orders/CREATED", "pgflow.shard": 0}
    s1 = {"pgflow.consumer": "orders/CREATED", "pgflow.shard": 1}
    assert (s0, (2, pytest.approx(0.07))) in got["pgflow.consumer.duration"]
    assert (s1, (1, pytest.approx(0.001))) in got["pgflow.consumer.duration"]
    assert got["pgflow.consumer.events"] == [(s0, 15)]
    assert got["pgflow.consumer.successes"] == [(s0, 14)]
    assert got["pgflow.consumer.errors"] == [(s0, 1)]
    assert got["pgflow.consumer.retries"] == [(s0, 1)]
    assert got["pgflow.consumer.dead_letters"] == [
        ({"pgflow.consumer": "payments", "pgflow.shard": 0}, 1)
    ]
    assert sorted(got["pgflow.consumer.lag"], key=lambda p: p[0]["pgflow.shard"]) == [
        (s0, 42),
        (s1, 0),
    ]
    assert (s0, 3.5) in got["pgflow.consumer.lag_time"]
    assert got["pgflow.horizon.age"] == [({}, 12.5)]


def test_lag_alert_counts_crossings_and_warns(
    reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    m = obs.metrics
    m.set_lag_alert("payments", 60.0)
    with caplog.at_level(logging.WARNING, logger="pgflow.observability"):
        m.lag_alert("payments", 0, 75.0)  # the engine reports every late event...
        m.lag_alert("payments", 0, 80.0)
        m.lag_alert("payments", 0, 90.0)
        m.lag("payments", 0, 3, 10.0)  # ...recovered (below the threshold)
        m.lag("payments", 0, 3, 95.0)  # crossed again, detected from the lag itself
        m.lag("payments", 1, 0, 0.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "payments shard 0 is lagging" in warnings[0].getMessage()
    assert "lag_alert 60s" in warnings[0].getMessage()
    got = points(reader)
    assert got["pgflow.consumer.lag_alerts"] == [
        ({"pgflow.consumer": "payments", "pgflow.shard": 0}, 2)
    ]


def test_lag_alert_rearms_after_a_quiet_period(
    reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(obs_metrics.time, "monotonic", lambda: now[0])
    obs.metrics.lag_alert("c", 0, 100.0)
    now[0] += obs.LAG_ALERT_REARM / 2
    obs.metrics.lag_alert("c", 0, 100.0)  # same crossing
    now[0] += obs.LAG_ALERT_REARM + 1
    obs.metrics.lag_alert("c", 0, 100.0)  # quiet for a while: a new crossing
    assert points(reader)["pgflow.consumer.lag_alerts"][0][1] == 2


def test_lag_alert_warns_even_without_metrics(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pgflow.observability"):
        obs.metrics.lag_alert("c", 0, 100.0)
    assert "c shard 0 is lagging" in caplog.text


async def test_sample_database_feeds_the_gauges(reader: InMemoryMetricReader, pool) -> None:
    async with pool.connection() as conn:
        await append(conn, [NewEvent("orders", "CREATED", f"o-{i}") for i in range(5)])
        await ensure_cursor(conn, CursorKey("orders/CREATED"), Filter("orders", ("CREATED",)))
        await ensure_cursor(conn, CursorKey("orders/PAID"), Filter("orders", ("PAID",)))
    obs.metrics.lag("gone/consumer", 0, 1, 1.0)  # a consumer that no longer exists
    rows = await obs.sample_database(pool)
    assert {(r.consumer, r.lag_events) for r in rows} == {("orders/CREATED", 5), ("orders/PAID", 0)}
    got = points(reader)
    lag = {p[0]["pgflow.consumer"]: p[1] for p in got["pgflow.consumer.lag"]}
    assert lag == {"orders/CREATED": 5, "orders/PAID": 0}
    (horizon,) = [v for _, v in got["pgflow.horizon.age"]]
    assert horizon >= 0  # cluster-wide: other sessions may hold it back


async def test_sample_database_is_free_when_off(pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(obs_config, "_global_meter_provider", lambda: None)

    class Untouchable:
        def connection(self) -> Any:
            raise AssertionError("sampled the database with metrics off")

    assert await obs.sample_database(Untouchable()) == []  # type: ignore[arg-type]
    assert await obs.sample_database(pool, force=True) == []  # no cursors yet
