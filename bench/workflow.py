"""Benchmark of the workflow engine: runs/s and trigger->complete latency.

    .venv/bin/python bench/workflow.py [--dsn DSN] [--quick] [--tracing on|off] [--no-dbos]

Creates a scratch database per scenario (dropped afterwards), prints a table and writes
``bench/results/workflow.json``. Durable commits (the server's settings are not touched:
``synchronous_commit`` stays as configured, normally ``on``).

Scenarios, each one end to end: this process triggers ``N`` runs from 32 concurrent
tasks while worker processes run the steps; the clock runs from the first trigger to the
last completion. Latency per run is measured on the database clock: the ``created_at``
of the run's last event minus that of its first (trigger insert -> final step's write).

* ``pgflow 1-step`` / ``pgflow 3-step`` with 1 and 2 worker processes
  (``pgflow worker``-equivalent processes running :class:`pgflow.Workflow`);
* ``pgflow+pgbouncer 1-step`` x1: the first scenario again, in the same run, with the
  worker and the triggering client going through a pgbouncer in transaction mode
  (``tests/_pgbouncer.py``, 20 server connections) started by the benchmark
  (``PGFLOW_POOLER=transaction``; LISTEN goes directly via ``PGFLOW_LISTEN_DSN``); the
  ratio pgbouncer / direct is printed. Skipped with a note when pgbouncer is missing;
* ``hand-written 1-step``: the same SQL statements pgflow issues (trigger CTE; per
  batch and shard: shard lock, cursor, gap-free read, records, one bulk record update +
  event insert, cursor CAS), as a bare psycopg loop (2 shards, polling every 2 ms
  instead of LISTEN) in one worker process — the ratio pgflow/hand-written is the
  engine's overhead (goal >= 0.7);
* ``dbos 1-step`` (if the ``dbos`` package is installed and works against the server):
  the same one-step workflow as DBOS ``@DBOS.workflow`` + ``@DBOS.step``, started with
  ``DBOS.start_workflow`` from 32 threads, for comparison.

``--tracing on`` exports every span (trigger and steps, all processes) over OTLP/HTTP to
a local receiver (``tests/_otlp_receiver.py``), configured only through the standard
``OTEL_*`` variables; ``bench/tracing.py`` runs the on/off comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    bench_args,
    print_table,
    scratch_database,
    summarize,
    write_results,
)

import pgflow
from pgflow.log.snapshots import diff_read_sql

GOALS = {"one_step_runs_per_s": 2000, "overhead_ratio": 0.7}
CONCURRENCY = 32
HERE = Path(__file__).resolve()


class Status(enum.IntEnum):
    START = 1
    STEP1 = 2
    STEP2 = 3
    DONE = 4


def make_workflow(
    steps: int, dsn: str, pooler: str | None = None
) -> pgflow.Workflow[dict[str, Any], Status]:
    b = pgflow.Builder(f"bench{steps}", dict, Status, batch_size=200, polling_frequency=0.1)
    chain = [*[Status.START, Status.STEP1, Status.STEP2][:steps], Status.DONE]
    for src, dest in itertools.pairwise(chain):

        async def step(run: pgflow.Run[dict[str, Any], Status], dest: Status = dest) -> Status:
            return dest

        b.add_step(src, step, dest, parallel_count=2)
    pool_size = int(os.environ.get("PGFLOW_BENCH_POOL", "16"))
    return b.build(dsn, pool_size=pool_size, pooler=pooler)


# -- worker processes ------------------------------------------------------------------


async def pgflow_worker(dsn: str, steps: int) -> None:
    from pgflow.cli._worker import serve

    await serve(make_workflow(steps, dsn))


# The same snapshot-diff read pgflow issues (pgflow.snapshots), as one SQL string.
HAND_READ = diff_read_sql(
    relation="pgflow.events",
    columns="e.id, e.tx, e.foreign_id, e.run_id, e.version, e.traceparent",
    where=[
        "e.stream = %(stream)s",
        "e.type = %(type)s",
        "int4eq(e.shard_hash %% %(shard_count)s::int4, %(shard)s::int4)",
    ],
)
HAND_LIMIT = 200


async def hand_shard(dsn: str, shard: int, shards: int, stop: asyncio.Event) -> None:
    """One shard of the 1-step worker, by hand, with the statements pgflow issues."""
    import psycopg

    from pgflow.workflow.records import _BULK_MOVE

    key = f"hand/START:{shard}:{shards}"
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute(
        "INSERT INTO pgflow.cursors (consumer, shard, shard_count, stream, types)"
        " VALUES ('hand/START', %s, %s, 'hand1', ARRAY['START']) ON CONFLICT DO NOTHING",
        (shard, shards),
    )
    while not stop.is_set():
        async with conn.transaction():
            await conn.execute("SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
            cur = await conn.execute(
                "SELECT snap::text, upto::text, after_id, lo, hi FROM pgflow.cursors"
                " WHERE consumer = 'hand/START' AND shard = %s AND shard_count = %s",
                (shard, shards),
            )
            old = await cur.fetchone()
            assert old is not None
            cur = await conn.execute(
                HAND_READ,
                {
                    "stream": "hand1",
                    "type": "START",
                    "__s1": old[0],
                    "__upto": old[1],
                    "__after": old[2],
                    "__lo": old[3],
                    "__hi": old[4],
                    "__limit": HAND_LIMIT + 1,
                    "shard": shard,
                    "shard_count": shards,
                },
            )
            rows = await cur.fetchall()
            more = len(rows) > HAND_LIMIT
            rows = rows[:HAND_LIMIT]
            events = [r[4:] for r in rows]
            if not rows and old[1] is not None:  # an exhausted diff: move to its end
                await conn.execute(
                    "UPDATE pgflow.cursors SET snap = upto, upto = NULL, after_id = 0"
                    " WHERE consumer = 'hand/START' AND shard = %s AND shard_count = %s",
                    (shard, shards),
                )
            if events:
                cur = await conn.execute(
                    "SELECT run_id, version, status, run_state, object FROM pgflow.records"
                    " WHERE run_id = ANY(%s::uuid[])",
                    ([e[3] for e in events],),
                )
                records = {r[0]: r for r in await cur.fetchall()}
                moves = [
                    (e[3], e[4], e[5])
                    for e in events
                    if (rec := records.get(e[3])) is not None and rec[1] == e[4]
                ]
                await conn.execute(
                    _BULK_MOVE,
                    (
                        [m[0] for m in moves],
                        [m[1] for m in moves],
                        ["DONE"] * len(moves),
                        ["COMPLETED"] * len(moves),
                        ["{}"] * len(moves),
                        [m[2] for m in moves],
                    ),
                )
                s2, lo, hi = rows[0][0], rows[0][1], rows[0][2]
                new = (old[0], s2, events[-1][0], lo, hi) if more else (s2, None, 0, None, None)
                await conn.execute(
                    "UPDATE pgflow.cursors SET snap = %s::pg_snapshot, upto = %s::pg_snapshot,"
                    " after_id = %s, lo = %s, hi = %s, updated_at = now()"
                    " WHERE consumer = 'hand/START' AND shard = %s AND shard_count = %s"
                    " AND snap::text = %s AND upto::text IS NOT DISTINCT FROM %s"
                    " AND after_id = %s",
                    (*new, shard, shards, old[0], old[1], old[2]),
                )
        if not more:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.002)
    await conn.close()


async def hand_worker(dsn: str) -> None:
    """The 1-step workflow's worker written by hand: 2 shards, polling every 2 ms."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.create_task(hand_shard(dsn, i, 2, stop)) for i in range(2)]
    print("hand worker running", flush=True)
    await asyncio.gather(*tasks)


def start_workers(
    kind: str, dsn: str, count: int, steps: int, tracing: bool, env: dict[str, str] | None = None
) -> list[Any]:
    env = {**os.environ, **(env or {}), "PGFLOW_BENCH_TRACING": "1" if tracing else "0"}
    procs = []
    for _ in range(count):
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), "--role", kind, "--steps", str(steps), "--dsn", dsn],
                stdout=subprocess.PIPE,
                env=env,
            )
        )
    for p in procs:
        assert p.stdout is not None
        p.stdout.readline()  # "... running"
    return procs


def stop_workers(procs: list[Any]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


# -- load and measurement --------------------------------------------------------------

HAND_TRIGGER = """
WITH r AS (
    INSERT INTO pgflow.records
        (run_id, workflow, foreign_id, status, run_state, object, version, traceparent)
    VALUES (gen_random_uuid(), 'hand1', %s, 'START', 'INITIATED', '{}'::jsonb, 1, NULL)
    RETURNING run_id, workflow, foreign_id, status, version, traceparent
)
INSERT INTO pgflow.events (stream, type, foreign_id, run_id, version, headers, traceparent)
SELECT r.workflow, r.status, r.foreign_id, r.run_id, r.version,
       '{"run_state": "INITIATED", "change": "trigger"}'::jsonb, r.traceparent FROM r
"""


async def drive(
    kind: str,
    dsn: str,
    runs: int,
    workflow: str,
    steps: int,
    observe_dsn: str | None = None,
    pooler: str | None = None,
) -> dict[str, Any]:
    """Trigger ``runs`` runs from CONCURRENCY tasks on ``dsn``; wait until all completed
    (watched on ``observe_dsn``, default ``dsn``)."""
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(runs):
        queue.put_nowait(i)
    wf = make_workflow(steps, dsn, pooler) if kind == "pgflow" else None
    pool: AsyncConnectionPool[Any] | None = None
    if kind == "hand":
        pool = AsyncConnectionPool(
            dsn, min_size=8, max_size=8, kwargs={"autocommit": True}, open=False
        )
        await pool.open(wait=True)

    async def trigger_loop() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if wf is not None:
                await wf.trigger(f"r{i}")
            else:
                assert pool is not None
                async with pool.connection() as conn:
                    await conn.execute(HAND_TRIGGER, (f"r{i}",))

    started = time.perf_counter()
    await asyncio.gather(*(trigger_loop() for _ in range(CONCURRENCY)))
    triggered = time.perf_counter() - started
    async with await psycopg.AsyncConnection.connect(observe_dsn or dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 600
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM pgflow.records WHERE workflow = %s"
                " AND run_state = 'COMPLETED'",
                (workflow,),
            )
            row = await cur.fetchone()
            if row and row[0] >= runs:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {row} of {runs} runs completed")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        cur = await conn.execute(
            "SELECT extract(epoch FROM max(e.created_at) - min(e.created_at)) * 1000"
            " FROM pgflow.events e WHERE e.stream = %s GROUP BY e.run_id",
            (workflow,),
        )
        latencies = [float(r[0]) for r in await cur.fetchall()]
    if wf is not None:
        await wf.close()
    if pool is not None:
        await pool.close()
    lat = summarize(latencies)
    return {
        "runs": runs,
        "seconds": elapsed,
        "trigger_seconds": triggered,
        "runs_per_s": runs / elapsed,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
    }


async def scenario(
    server: str,
    kind: str,
    workers: int,
    steps: int,
    runs: int,
    tracing: bool,
    bouncer: Any = None,
) -> dict[str, Any]:
    """One scenario on a scratch database; with ``bouncer`` (a running pgbouncer) the
    workers and the triggering client go through it, in transaction-pooling mode."""
    async with scratch_database(server, prefix="pgflow_bench_wf") as dsn:
        app_dsn, env, pooler = dsn, {}, None
        if bouncer is not None:
            app_dsn, pooler = bouncer.dsn_for(dsn), "transaction"
            env = {"PGFLOW_POOLER": pooler, "PGFLOW_LISTEN_DSN": dsn}
        procs = start_workers(kind, app_dsn, workers, steps, tracing, env)
        try:
            name = f"bench{steps}" if kind == "pgflow" else "hand1"
            result = await drive(kind, app_dsn, runs, name, steps, dsn, pooler)
        finally:
            stop_workers(procs)
    label = "pgflow" if kind == "pgflow" else "hand-written"
    if bouncer is not None:
        label += "+pgbouncer"
    return {"system": label, "steps": steps, "workers": workers, **result}


@contextlib.contextmanager
def maybe_pgbouncer(server: str) -> Iterator[Any]:
    """A production-like pgbouncer (transaction mode) in front of ``server``, or None
    (with the reason printed) when it cannot run here."""
    from tests._pgbouncer import pgbouncer

    with contextlib.ExitStack() as stack:
        try:
            bouncer = stack.enter_context(pgbouncer(server, pool_size=20, round_robin=False))
        except RuntimeError as exc:
            print(f"pgbouncer row skipped: {exc}", flush=True)
            bouncer = None
        yield bouncer


# -- DBOS ------------------------------------------------------------------------------


def dbos_scenario(server: str, runs: int) -> dict[str, Any] | str:
    """The 1-step workflow on DBOS (in this process, as DBOS runs it); or why it can't."""
    try:
        import dbos  # noqa: F401
    except ImportError:
        return "dbos not installed (pip install dbos)"
    out = subprocess.run(
        [sys.executable, str(HERE), "--role", "dbos", "--dsn", server, "--runs", str(runs)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return "dbos failed: " + " | ".join(tail)
    import json

    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def dbos_run(server: str, runs: int) -> None:
    """Child process: create a scratch database, run the DBOS workflow, print JSON."""
    import json
    import threading
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"pgflow_bench_dbos_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(server)
    params["dbname"] = name
    url = "postgresql://{user}@{host}:{port}/{db}".format(
        user=params.get("user", "postgres"),
        host=params.get("host", "127.0.0.1"),
        port=params.get("port", 5432),
        db=name,
    )
    _ = make_conninfo
    try:
        from dbos import DBOS, DBOSConfig

        config: DBOSConfig = {"name": "pgflow-bench", "system_database_url": url}
        DBOS(config=config)
        latencies: list[float] = []
        lock = threading.Lock()

        @DBOS.step()
        def step_one(x: int) -> int:
            return x + 1

        @DBOS.workflow()
        def one_step(x: int) -> int:
            return step_one(x)

        DBOS.launch()
        warm = DBOS.start_workflow(one_step, -1)
        warm.get_result()

        def one(i: int) -> None:
            t0 = time.perf_counter()
            handle = DBOS.start_workflow(one_step, i)
            handle.get_result()
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)

        started = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as ex:
            list(ex.map(one, range(runs)))
        elapsed = time.perf_counter() - started
        DBOS.destroy()
        lat = summarize(latencies)
        print(
            json.dumps(
                {
                    "system": "dbos",
                    "steps": 1,
                    "workers": 1,
                    "runs": runs,
                    "seconds": elapsed,
                    "trigger_seconds": elapsed,
                    "runs_per_s": runs / elapsed,
                    "p50_ms": lat["p50"],
                    "p99_ms": lat["p99"],
                }
            )
        )
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- main ------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    runs = args.runs or (600 if args.quick else 20_000)
    tracing = args.tracing == "on"
    if tracing:  # OTLP/HTTP to a local receiver; workers inherit the environment
        from tests._otlp_receiver import OtlpReceiver

        receiver = OtlpReceiver(keep=False).__enter__()
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        os.environ["OTEL_METRICS_EXPORTER"] = "none"
    rows: list[dict[str, Any]] = []
    plan = [
        ("pgflow", 1, 1),
        ("pgflow", 2, 1),
        ("pgflow", 1, 3),
        ("pgflow", 2, 3),
        ("hand", 1, 1),
    ]
    pooled_ratio: float | None = None
    with maybe_pgbouncer(args.dsn) as bouncer:
        if bouncer is not None:
            plan.insert(1, ("pgbouncer", 1, 1))
        for kind, workers, steps in plan:
            n = runs if steps == 1 else runs // 2
            if kind == "pgbouncer":
                row = await scenario(args.dsn, "pgflow", workers, steps, n, tracing, bouncer)
                pooled_ratio = row["runs_per_s"] / rows[0]["runs_per_s"]
            else:
                row = await scenario(args.dsn, kind, workers, steps, n, tracing)
            rows.append(row)
            print(
                f"{row['system']:>12} {steps}-step x{workers}: {row['runs_per_s']:.0f} runs/s,"
                f" p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms",
                flush=True,
            )
    dbos_note = None
    if not args.no_dbos:
        dbos = await asyncio.to_thread(dbos_scenario, args.dsn, 300 if args.quick else 3000)
        if isinstance(dbos, dict):
            rows.append(dbos)
        else:
            dbos_note = dbos
            print(dbos, flush=True)
    print_table(
        rows,
        ["system", "steps", "workers", "runs", "seconds", "runs_per_s", "p50_ms", "p99_ms"],
    )
    best_one = max(r["runs_per_s"] for r in rows if r["system"] == "pgflow" and r["steps"] == 1)
    pg1 = next(r for r in rows if r["system"] == "pgflow" and r["steps"] == 1)
    hand = next(r for r in rows if r["system"] == "hand-written")
    ratio = pg1["runs_per_s"] / hand["runs_per_s"]
    print(
        f"\none-step runs/s (best): {best_one:.0f} (goal {GOALS['one_step_runs_per_s']});"
        f" pgflow / hand-written (1 worker): {ratio:.2f} (goal {GOALS['overhead_ratio']})"
    )
    if pooled_ratio is not None:
        print(f"one-step runs/s through pgbouncer / direct (1 worker): {pooled_ratio:.2f}")
    path = write_results(
        "workflow",
        {
            "quick": args.quick,
            "tracing": tracing,
            "concurrency": CONCURRENCY,
            "goals": GOALS,
            "rows": rows,
            "best_one_step_runs_per_s": best_one,
            "overhead_ratio": ratio,
            "pgbouncer_ratio": pooled_ratio,
            "dbos": dbos_note or "ok",
        },
        path=args.out,
    )
    print(f"wrote {path}")
    return 0


def cli() -> int:
    parser = argparse.ArgumentParser(description="pgflow workflow engine benchmark")
    parser.add_argument("--tracing", choices=["on", "off"], default="off")
    parser.add_argument("--no-dbos", action="store_true", help="skip the DBOS comparison")
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=0, help="runs per 1-step scenario")
    args = bench_args(__doc__ or "", parser=parser)
    if args.role == "pgflow":
        asyncio.run(pgflow_worker(args.dsn, args.steps))
        return 0
    if args.role == "hand":
        asyncio.run(hand_worker(args.dsn))
        return 0
    if args.role == "dbos":
        dbos_run(args.dsn, args.runs)
        return 0
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
