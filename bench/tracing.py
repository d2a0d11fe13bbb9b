"""Benchmark of tracing overhead: workflow throughput with OTLP export on vs off.

    .venv/bin/python bench/tracing.py [--dsn DSN] [--quick] [--rounds N] [--runs N]

Prints a table and writes ``bench/results/tracing.json``. Two phases:

a) **end to end** — the ``pgflow 3-step`` scenario of ``bench/workflow.py`` (this
   process triggers N runs from 32 tasks, two worker processes run the steps, the clock
   runs from the first trigger to the last completion), alternately with tracing off
   and on. "On" is the real thing: every process exports over OTLP/HTTP to a local
   receiver (``tests/_otlp_receiver.py``, which decodes every request) — the workers
   configured only by ``OTEL_EXPORTER_OTLP_ENDPOINT`` & co., the triggering process
   by ``pgflow.observability.configure``. Off/on rounds alternate to spread drift and
   the ratio of medians is reported (goal: on / off >= 0.85).
b) **per hook** — the cost of one ``step_span`` enter/exit in a tight loop: off
   (a shared null context), and on (SDK span + batch processor + OTLP exporter).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workflow as wfbench  # bench/workflow.py: the scenarios
from _common import bench_args, print_table, write_results

from pgflow import observability as obs
from tests._otlp_receiver import OtlpReceiver

GOAL = 0.85
OTEL_ENV = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_METRICS_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)
#: mode -> sampled fraction (None: tracing off)
MODES: dict[str, float | None] = {"off": None, "on": 1.0, "on-10%": 0.1}


def _provider(receiver: OtlpReceiver) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "bench-driver"}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
    )
    return provider


def _set_tracing(mode: str, receiver: OtlpReceiver) -> Any:
    """Workers inherit os.environ (bench/workflow.py start_workers); the driver is
    configured explicitly. Returns the driver's provider (to shut down) or None."""
    for var in OTEL_ENV:
        os.environ.pop(var, None)
    obs.reset()
    fraction = MODES[mode]
    if fraction is None:
        obs.disable()
        return None
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    os.environ["OTEL_SERVICE_NAME"] = "bench-worker"
    os.environ["OTEL_METRICS_EXPORTER"] = "none"  # traces only, as with Jaeger
    if fraction < 1.0:
        # Sampled at the root (the trigger); steps follow the stored sampled flag.
        os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        os.environ["OTEL_TRACES_SAMPLER_ARG"] = str(fraction)
    provider = _provider(receiver)
    obs.configure(tracer_provider=provider)
    return provider


async def end_to_end(
    server: str, receiver: OtlpReceiver, rounds: int, runs: int, workers: int
) -> list[dict[str, Any]]:
    rows = []
    for i in range(rounds):
        order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
        for mode in order:
            provider = _set_tracing(mode, receiver)
            before = receiver.span_count
            try:
                on = MODES[mode] is not None
                row = await wfbench.scenario(server, "pgflow", workers, 3, runs, on)
            finally:
                if provider is not None:
                    provider.shutdown()
                obs.reset()
            # the workers flush their spans when they exit (stop_workers waits for it)
            spans = receiver.span_count - before
            rows.append({"round": i + 1, "tracing": mode, **row, "spans": spans})
            print(
                f"round {i + 1} tracing {mode:>6}: {row['runs_per_s']:.0f} runs/s,"
                f" p50 {row['p50_ms']:.1f} ms, spans exported {spans}",
                flush=True,
            )
    for var in OTEL_ENV:
        os.environ.pop(var, None)
    return rows


def per_hook(receiver: OtlpReceiver, n: int) -> dict[str, float]:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    attrs = {"workflow": "bench", "status": "A", "foreign_id": "f", "run_id": "r", "shard": 0}

    def loop() -> float:
        started = time.perf_counter()
        for _ in range(n):
            with obs.step_span("bench A", tp, attrs):
                pass
        return (time.perf_counter() - started) / n * 1e6

    obs.reset()
    obs.disable()
    off = min(loop() for _ in range(3))
    provider = _provider(receiver)
    obs.configure(tracer_provider=provider)
    on = min(loop() for _ in range(3))
    provider.force_flush()
    provider.shutdown()
    obs.reset()
    return {"spans_per_loop": n, "off_us": off, "on_us": on, "delta_us": on - off}


async def main(args: argparse.Namespace) -> int:
    runs = args.runs or (300 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    with OtlpReceiver(keep=False) as receiver:
        rows = await end_to_end(args.dsn, receiver, rounds, runs, args.workers)
        hook = per_hook(receiver, 2000 if args.quick else 20000)
    print()
    print_table(
        rows, ["round", "tracing", "runs", "seconds", "runs_per_s", "p50_ms", "p99_ms", "spans"]
    )
    median = {
        mode: statistics.median(r["runs_per_s"] for r in rows if r["tracing"] == mode)
        for mode in MODES
    }
    off, on = median["off"], median["on"]
    ratio = on / off
    ratio_sampled = median["on-10%"] / off
    expected = runs * 4  # trigger + 3 steps per run
    exported = [r["spans"] for r in rows if r["tracing"] == "on"]
    print(
        f"\n3-step runs/s, median of {rounds}: off {off:.0f}, on {on:.0f},"
        f" on-10% {median['on-10%']:.0f}; on / off = {ratio:.2f} (goal >= {GOAL}),"
        f" on-10% / off = {ratio_sampled:.2f}; spans exported per on-round {exported}"
        f" (expected {expected})"
    )
    print(
        f"step_span: off {hook['off_us']:.2f} us, on {hook['on_us']:.1f} us"
        f" (+{hook['delta_us']:.1f} us per span, OTLP export included)"
    )
    path = write_results(
        "tracing",
        {
            "quick": args.quick,
            "workers": args.workers,
            "goal_ratio": GOAL,
            "rows": rows,
            "median_runs_per_s": median,
            "ratio_on_off": ratio,
            "ratio_sampled_10pct_off": ratio_sampled,
            "spans_expected_per_on_round": expected,
            "per_hook": hook,
        },
        path=args.out,
    )
    print(f"wrote {path}")
    return 0


def cli() -> int:
    parser = argparse.ArgumentParser(description="pgflow tracing overhead benchmark")
    parser.add_argument("--rounds", type=int, default=0, help="off/on pairs (default 3)")
    parser.add_argument("--runs", type=int, default=0, help="runs per scenario (default 2000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = bench_args(__doc__ or "", parser=parser)
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
