"""One run = one trace, across processes, exported over real OTLP/HTTP.

The test process triggers a run of a 3-step workflow; two ``pgflow worker``
subprocesses, configured only through ``OTEL_*`` environment variables, run the steps
— worker A the first step, worker B the other two — and export their spans and metrics
to a real OTLP/HTTP receiver (tests/_otlp_receiver.py). The receiver must end up with
one trace: trigger (test process) → charge (A) → pack (B) → ship (B), each span the
child of the previous one.

Which worker runs which step is made deterministic without changing the graph: every
process builds the same workflow, but holds back the steps that belong to the other
worker with ``consume_lag`` of an hour (its consumer never delivers a fresh event, so
the cursor is left to the owner).
"""

from __future__ import annotations

import asyncio
import enum
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import pgflow
from pgflow import observability as obs
from tests._otlp_receiver import OtlpReceiver, ReceivedSpan
from tests._util import wait_until

REPO = Path(__file__).resolve().parent.parent
HOLD = timedelta(hours=1)


class Status(enum.IntEnum):
    CREATED = 1
    CHARGED = 2
    PACKED = 3
    SHIPPED = 4


async def charge(run: pgflow.Run[dict[str, Any], Status]) -> Status:
    return Status.CHARGED


async def pack(run: pgflow.Run[dict[str, Any], Status]) -> Status:
    return Status.PACKED


async def ship(run: pgflow.Run[dict[str, Any], Status]) -> Status:
    return Status.SHIPPED


#: status -> the worker that runs its step
OWNER = {Status.CREATED: "a", Status.CHARGED: "b", Status.PACKED: "b"}


def make_builder(role: str) -> pgflow.Builder[dict[str, Any], Status]:
    def opts(status: Status) -> dict[str, Any]:
        return {"consume_lag": timedelta(0) if OWNER[status] == role else HOLD}

    b = pgflow.Builder("traced", dict, Status, polling_frequency=0.1)
    b.add_step(Status.CREATED, charge, Status.CHARGED, **opts(Status.CREATED))
    b.add_step(Status.CHARGED, pack, Status.PACKED, **opts(Status.CHARGED))
    b.add_step(Status.PACKED, ship, Status.SHIPPED, **opts(Status.PACKED))
    return b


def worker_wf() -> pgflow.Workflow[dict[str, Any], Status]:
    """`pgflow worker tests.test_observability_trace:worker_wf` (role from TRACE_ROLE)."""
    return make_builder(os.environ["TRACE_ROLE"]).build(None)


def start_worker(dsn: str, role: str, receiver: OtlpReceiver, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "PGFLOW_DATABASE_URL": dsn,
        "TRACE_ROLE": role,
        # Only standard OpenTelemetry settings: nothing pgflow-specific.
        "OTEL_SERVICE_NAME": f"worker-{role}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }
    out = log.open("wb")
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "pgflow"),
            "worker",
            "tests.test_observability_trace:worker_wf",
        ],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


async def test_a_run_is_one_trace_across_two_worker_processes(
    pgflow_dsn: str, tmp_path: Path
) -> None:
    with OtlpReceiver() as receiver:
        # The triggering process exports to the same receiver (an app's own setup).
        provider = TracerProvider(resource=Resource.create({"service.name": "pgflow-test"}))
        provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
        )
        obs.configure(tracer_provider=provider)
        workers = [
            start_worker(pgflow_dsn, role, receiver, tmp_path / f"worker-{role}.log")
            for role in ("a", "b")
        ]
        try:
            client = make_builder("client").build(pgflow_dsn)
            try:
                run_id = await client.trigger("order-1", initial={"amount": 10})
            finally:
                await client.close()

            async def completed() -> bool:
                async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
                    cur = await conn.execute(
                        "SELECT run_state FROM pgflow.records WHERE run_id = %s", (run_id,)
                    )
                    row = await cur.fetchone()
                return row is not None and row[0] == "COMPLETED"

            await wait_until(completed, timeout=60, interval=0.1, message="the run to complete")

            def trace_spans() -> list[ReceivedSpan]:
                spans = receiver.spans()
                trig = [s for s in spans if s.name == "trigger traced"]
                if not trig:
                    return []
                return [s for s in spans if s.trace_id == trig[0].trace_id]

            async def all_spans() -> list[ReceivedSpan]:
                got = trace_spans()
                return got if len(got) >= 4 else []

            spans = await wait_until(all_spans, timeout=30, message="4 spans at the receiver")
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            codes = [await asyncio.to_thread(w.wait, 60) for w in workers]
            obs.reset()
            provider.shutdown()
        logs = "\n".join((tmp_path / f"worker-{r}.log").read_text() for r in ("a", "b"))
        assert codes == [0, 0], logs

        by_name = {s.name: s for s in spans}
        assert sorted(by_name) == [
            "process traced CHARGED",
            "process traced CREATED",
            "process traced PACKED",
            "trigger traced",
        ], spans
        trigger = by_name["trigger traced"]
        charge_s = by_name["process traced CREATED"]
        pack_s = by_name["process traced CHARGED"]
        ship_s = by_name["process traced PACKED"]
        # three processes, one trace
        assert (trigger.service, charge_s.service, pack_s.service, ship_s.service) == (
            "pgflow-test",
            "worker-a",
            "worker-b",
            "worker-b",
        )
        assert len({s.trace_id for s in spans}) == 1
        # trigger -> charge -> pack -> ship, each the parent of the next
        assert trigger.parent_span_id == ""
        assert charge_s.parent_span_id == trigger.span_id
        assert pack_s.parent_span_id == charge_s.span_id
        assert ship_s.parent_span_id == pack_s.span_id
        assert trigger.kind == "PRODUCER"
        assert {charge_s.kind, pack_s.kind, ship_s.kind} == {"CONSUMER"}
        for span in (trigger, charge_s, pack_s, ship_s):
            assert span.attributes["pgflow.workflow"] == "traced"
            assert span.attributes["pgflow.foreign_id"] == "order-1"
            assert span.attributes["pgflow.run_id"] == str(run_id)
            assert span.attributes["messaging.system"] == "pgflow"
            assert span.status_code != 2  # not ERROR
        assert pack_s.attributes["pgflow.consumer"] == "traced/CHARGED"
        assert isinstance(pack_s.attributes["pgflow.shard"], int)

        # The database points at the same trace: what to paste into Jaeger.
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute(
                "SELECT trace_id FROM pgflow.runs WHERE run_id = %s", (run_id,)
            )
            assert await cur.fetchone() == (trigger.trace_id,)
            cur = await conn.execute(
                "SELECT status, traceparent FROM pgflow.run_history WHERE run_id = %s"
                " ORDER BY step",
                (run_id,),
            )
            history = await cur.fetchall()
        assert [h[0] for h in history] == ["CREATED", "CHARGED", "PACKED", "SHIPPED"]
        assert [h[1].split("-")[2] for h in history] == [
            trigger.span_id,
            charge_s.span_id,
            pack_s.span_id,
            ship_s.span_id,
        ]

        # Metrics came through the same endpoint, per consumer, from each worker.
        successes = {
            (service, attrs["pgflow.consumer"])
            for service, name, attrs, value in receiver.metrics()
            if name == "pgflow.consumer.successes" and value >= 1
        }
        assert {
            ("worker-a", "traced/CREATED"),
            ("worker-b", "traced/CHARGED"),
            ("worker-b", "traced/PACKED"),
        } <= successes
