"""A real OTLP/HTTP receiver for tests (no Jaeger or Collector binary exists here).

Listens on 127.0.0.1 (a free port), accepts ``POST /v1/traces`` and ``POST
/v1/metrics`` with protobuf bodies (optionally gzip/deflate-compressed), decodes them
with ``opentelemetry-proto`` and keeps what it received. The exporters under test talk
to it exactly as they would to Jaeger all-in-one on port 4318.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["OtlpReceiver", "ReceivedSpan"]

SPAN_KINDS = {
    0: "UNSPECIFIED",
    1: "INTERNAL",
    2: "SERVER",
    3: "CLIENT",
    4: "PRODUCER",
    5: "CONSUMER",
}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # PRODUCER, CONSUMER, ...
    service: str
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0  # 2 = ERROR
    links: tuple[tuple[str, str], ...] = ()


class OtlpReceiver:
    """``with OtlpReceiver() as r: ... r.endpoint ... r.spans()``.

    ``keep=False`` (benchmarks) only parses each request and counts its spans
    (:attr:`span_count`), so the receiver's own CPU use stays small next to the
    processes being measured.
    """

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.span_count = 0
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._metrics: list[tuple[str, str, dict[str, Any], Any]] = []
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                try:
                    if self.path == "/v1/traces":
                        req = ExportTraceServiceRequest()
                        req.ParseFromString(body)
                        receiver._add_traces(req)
                        reply = ExportTraceServiceResponse().SerializeToString()
                    elif self.path == "/v1/metrics":
                        mreq = ExportMetricsServiceRequest()
                        mreq.ParseFromString(body)
                        receiver._add_metrics(mreq)
                        reply = ExportMetricsServiceResponse().SerializeToString()
                    else:
                        self.send_error(404)
                        return
                except Exception:  # a malformed body: tell the exporter
                    self.send_error(400)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """Base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (exporters append /v1/traces)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _add_traces(self, req: ExportTraceServiceRequest) -> None:
        if not self.keep:
            n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            with self._lock:
                self.requests += 1
                self.span_count += n
            return
        got = []
        for rs in req.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            service = str(resource.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=SPAN_KINDS.get(s.kind, str(s.kind)),
                            service=service,
                            attributes={kv.key: _value(kv.value) for kv in s.attributes},
                            status_code=s.status.code,
                            links=tuple((lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links),
                        )
                    )
        with self._lock:
            self.requests += 1
            self.span_count += len(got)
            self._spans.extend(got)

    def _add_metrics(self, req: ExportMetricsServiceRequest) -> None:
        if not self.keep:
            return
        got = []
        for rm in req.resource_metrics:
            resource = {kv.key: _value(kv.value) for kv in rm.resource.attributes}
            service = str(resource.get("service.name", ""))
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for attrs, value in _points(m):
                        got.append((service, m.name, attrs, value))
        with self._lock:
            self.requests += 1
            self._metrics.extend(got)

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def metrics(self) -> list[tuple[str, str, dict[str, Any], Any]]:
        """(service, metric name, attributes, value) for every data point received."""
        with self._lock:
            return list(self._metrics)


def _points(metric: Any) -> Iterator[tuple[dict[str, Any], Any]]:
    kind = metric.WhichOneof("data")
    data = getattr(metric, kind)
    for p in data.data_points:
        attrs = {kv.key: _value(kv.value) for kv in p.attributes}
        if kind == "histogram":
            yield attrs, (p.count, p.sum)
        else:
            yield attrs, p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
