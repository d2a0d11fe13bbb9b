"""Benchmark of the connectors: how fast outside events become workflow runs.

    .venv/bin/python bench/connectors.py [--dsn DSN] [--quick] [--private-server]
                                         [--only memory|table|capture|webhook ...]

Each scenario runs in a scratch database (dropped afterwards) with one workflow whose
connector function calls ``api.trigger(foreign_id, ..., run_id=run_id_for(...))`` for
every event (idempotent trigger, as real connectors do), while the workflow's one step
runs too. The clock runs from the moment the events are available to the moment the
last run exists (``pgflow.records`` polled every 20 ms); the rate is events/s.

* ``memory pN``: a backlog of N events in the in-memory connector, ``parallel_count``
  1 and 4 (transactional path: one transaction per batch of 200; the memory consumer
  settles its acks when that transaction committed). Goal: >= 5,000 events/s.
* ``memory-broker pN``: the same, its consumers made broker-like
  (``Connector(..., broker=True)``: ``recv()`` only), so the runner's broker path runs:
  events already received are batched (up to ``batch_size``) into one transaction,
  acked after its commit.
* ``table pN``: a backlog of N rows in an app table (``tx xid8`` column), tailed by the
  table connector (transactional path: one transaction per batch, the cursor commits
  with the runs — exactly-once).
* ``capture``: N rows inserted into a captured table, tailed through ``pgflow.changes``.
* ``webhook``: 32 concurrent HTTP/1.1 keep-alive clients post N events; reported are
  the durable-accept rate (each ``200`` after its group commit) and the end-to-end rate
  to runs.

Durable commits (``synchronous_commit`` as configured, normally ``on``). Writes
``bench/results/connectors.json``.

Where the time goes. The per-event path costs, per event, the runner's savepoint,
``trigger``'s own savepoint, the record+event insert and the releases (about five round
trips; ~300-800 events/s here). Transactional batches are therefore first tried
optimistically (``pgflow._batch_api``): no savepoints, the batch's triggers buffered
and written in ONE multi-row statement, falling back to the per-event path for a batch
that is not ordinary. What remains per event is Python (the function, ``trigger``'s
validation and serialisation, spans); the connector's acks cost nothing per event: the
memory connector settles them after the commit, and the table connector (also the
capture and webhook scenarios) counts them in memory and writes its cursor with ONE
compare-and-set per batch (the batch's last ack, or the runner's ``flush_in`` before
commit) — before that change, one cursor UPDATE per event capped them at ~3,000/s.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_args, print_table, scratch_database, server, write_results

import pgflow
from pgflow.connectors import ConnectorEvent, table, webhook
from pgflow.connectors.memory import Connector as MemoryConnector
from pgflow.connectors.memory import event

GOALS = {"memory_events_per_s": 5000}
WEBHOOK_CLIENTS = 32
SCENARIOS = ("memory", "table", "capture", "webhook")


class Status(enum.IntEnum):
    RECEIVED = 1
    DONE = 2


async def done(run: pgflow.Run[dict[str, Any], Status]) -> Status:
    return Status.DONE


async def trigger(api: pgflow.API[dict[str, Any], Status], ev: ConnectorEvent) -> None:
    await api.trigger(
        ev.foreign_id,
        {"amount": ev.headers.get("amount", "0")},
        Status.RECEIVED,
        run_id=pgflow.run_id_for("bench", ev.id),
    )


def build(dsn: str, connector: Any, parallel_count: int = 1) -> pgflow.Workflow[Any, Status]:
    b: pgflow.Builder[dict[str, Any], Status] = pgflow.Builder("ingest", dict, Status)
    b.add_step(Status.RECEIVED, done, Status.DONE, batch_size=500, polling_frequency=0.2)
    b.add_connector(
        "source",
        connector,
        trigger,
        parallel_count=parallel_count,
        batch_size=200,
        polling_frequency=0.02,
    )
    return b.build(dsn, pool_size=max(4, parallel_count + 3))


async def _runs(dsn: str) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM pgflow.records WHERE workflow = 'ingest'")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def _until_runs(dsn: str, n: int, timeout: float) -> float:
    """Seconds until ``n`` runs exist (polling every 20 ms)."""
    start = time.perf_counter()
    while await _runs(dsn) < n:
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"only {await _runs(dsn)} of {n} runs after {timeout}s")
        await asyncio.sleep(0.02)
    return time.perf_counter() - start


def _events(n: int) -> list[ConnectorEvent]:
    return [event(f"e{i}", f"acct-{i}", "payment.completed", amount=str(i)) for i in range(n)]


async def scenario_memory(dsn: str, n: int, parallel: int, broker: bool = False) -> dict[str, Any]:
    memory = MemoryConnector(_events(n), broker=broker)
    wf = build(dsn, memory, parallel)
    await wf.run()
    try:
        seconds = await _until_runs(dsn, n, timeout=300)
    finally:
        await wf.stop()
    name = f"memory-broker p{parallel}" if broker else f"memory p{parallel}"
    return {"scenario": name, "events": n, "seconds": seconds}


async def scenario_table(dsn: str, n: int, parallel: int) -> dict[str, Any]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE payments (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " tx xid8 NOT NULL DEFAULT pg_current_xact_id(), foreign_id text NOT NULL,"
            " type text NOT NULL, amount numeric NOT NULL);"
            " CREATE INDEX ON payments (tx, id)"
        )
        await conn.execute(
            "INSERT INTO payments (foreign_id, type, amount)"
            " SELECT 'acct-' || g, 'payment.completed', g FROM generate_series(1, %s) g",
            (n,),
        )
    connector = table.Connector(table.TableStream("payments"), table.CursorStore(dsn))
    wf = build(dsn, connector, parallel)
    await wf.run()
    try:
        seconds = await _until_runs(dsn, n, timeout=300)
    finally:
        await wf.stop()
        await connector.close()
    return {"scenario": f"table p{parallel}", "events": n, "seconds": seconds}


async def scenario_capture(dsn: str, n: int) -> dict[str, Any]:
    import psycopg

    from pgflow.connectors.capture import changes_stream, make_change_translator

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " account text NOT NULL, amount numeric NOT NULL)"
        )
    await pgflow.capture(dsn, "orders")
    connector = table.Connector(
        changes_stream("orders"),
        table.CursorStore(dsn),
        make_change_translator(foreign_id=lambda c: str(c.row["account"])),
    )
    wf = build(dsn, connector)
    await wf.run()
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            start = time.perf_counter()
            await conn.execute(
                "INSERT INTO orders (account, amount)"
                " SELECT 'acct-' || g, g FROM generate_series(1, %s) g",
                (n,),
            )
        await _until_runs(dsn, n, timeout=300)
        seconds = time.perf_counter() - start
    finally:
        await wf.stop()
        await connector.close()
    return {"scenario": "capture (1 insert of N rows)", "events": n, "seconds": seconds}


async def _client(url_host: str, port: int, bodies: list[bytes]) -> None:
    reader, writer = await asyncio.open_connection(url_host, port)
    try:
        for body in bodies:
            writer.write(
                b"POST / HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"webhook answered {head.splitlines()[0]!r}")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
    finally:
        writer.close()


async def scenario_webhook(dsn: str, n: int) -> list[dict[str, Any]]:
    hook = webhook.Connector(dsn, "bench")
    wf = build(dsn, hook)
    await wf.run()  # starts the HTTP server (make) too
    try:
        bodies = [
            json.dumps(
                {
                    "id": f"w{i}",
                    "foreign_id": f"acct-{i}",
                    "type": "payment.completed",
                    "headers": {"amount": str(i)},
                }
            ).encode()
            for i in range(n)
        ]
        start = time.perf_counter()
        await asyncio.gather(
            *(
                _client(hook.host, hook.port, bodies[k::WEBHOOK_CLIENTS])
                for k in range(WEBHOOK_CLIENTS)
            )
        )
        accepted = time.perf_counter() - start
        await _until_runs(dsn, n, timeout=300)
        total = time.perf_counter() - start
    finally:
        await wf.stop()
        await hook.stop()
    return [
        {
            "scenario": f"webhook accept ({WEBHOOK_CLIENTS} clients)",
            "events": n,
            "seconds": accepted,
        },
        {"scenario": "webhook -> runs", "events": n, "seconds": total},
    ]


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SCENARIOS,
        default=list(SCENARIOS),
        help="run these scenarios only (default: all)",
    )
    args = bench_args(__doc__ or "", argv, parser)
    n_memory, n_table, n_hook = (300, 500, 300) if args.quick else (6000, 10000, 4000)
    rows: list[dict[str, Any]] = []

    async def run(fn: Callable[[str], Awaitable[Any]]) -> None:
        with server(args) as server_dsn:
            async with scratch_database(server_dsn, prefix="pgflow_bench_conn") as dsn:
                result = await fn(dsn)
        for row in result if isinstance(result, list) else [result]:
            row["events_per_s"] = row["events"] / row["seconds"]
            rows.append(row)
            print(f"  {row['scenario']}: {row['events_per_s']:,.0f} events/s", flush=True)

    if "memory" in args.only:
        await run(lambda dsn: scenario_memory(dsn, n_memory, 1))
        await run(lambda dsn: scenario_memory(dsn, n_memory, 4))
        await run(lambda dsn: scenario_memory(dsn, n_memory, 1, broker=True))
        await run(lambda dsn: scenario_memory(dsn, n_memory, 4, broker=True))
    if "table" in args.only:
        await run(lambda dsn: scenario_table(dsn, n_table, 1))
    if "capture" in args.only:
        await run(lambda dsn: scenario_capture(dsn, n_table))
    if "webhook" in args.only:
        await run(lambda dsn: scenario_webhook(dsn, n_hook))
    print()
    print_table(rows, ["scenario", "events", "seconds", "events_per_s"])
    memory_rates = [r["events_per_s"] for r in rows if r["scenario"].startswith("memory p")]
    best_memory = max(memory_rates, default=0.0)
    if memory_rates:
        print(
            f"\nmemory connector -> trigger: {best_memory:,.0f} events/s"
            f" (goal >= {GOALS['memory_events_per_s']:,})"
        )
    path = write_results(
        "connectors",
        {
            "quick": bool(args.quick),
            # the machine is shared: load when the run ended (1, 5, 15 min)
            "load_average": list(os.getloadavg()),
            "goals": GOALS,
            "scenarios": rows,
            "memory_best_events_per_s": best_memory,
            "memory_goal_met": best_memory >= GOALS["memory_events_per_s"],
        },
        path=args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
