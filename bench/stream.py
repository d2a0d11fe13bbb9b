"""Benchmark of the core event log: tail throughput, wake-up latency, writer impact.

    .venv/bin/python bench/stream.py [--dsn DSN] [--quick]

Creates a scratch database on the server (dropped afterwards), prints a table and
writes ``bench/results/stream.json``. Phases (each ~10 s, ~2 s with ``--quick``):

a) tail throughput of one shard: a preloaded backlog consumed with ``consume_once``
   (advisory lock + cursor CAS per batch, trivial handler), against the same
   statements hand-written with psycopg (the ratio is pgflow's own overhead);
   then the catch-up of a much larger backlog (1,000,000 events; 50,000 with
   ``--quick``): its rate must not fall below the tail's (no per-batch sort of the
   backlog);
b) commit -> handler latency: one writer commits an event every few ms and pokes the
   Notifier; a Consumer receives it (same process, one monotonic clock) via
   NOTIFY (cross-connection), via the in-process poke, and by polling only; and via
   NOTIFY again while another session holds a transaction with an xid open in ANOTHER
   database of the server for the whole phase (0.1 stalled every reader then);
c) writer throughput: 32 writer connections (in a child process) each committing
   one-event transactions, alone vs. with Listener + Notifier + Consumer running, and
   the bad alternative: ``pg_notify`` inside every write transaction;
d) the cost of the trigger that stamps ``tx``: one connection's single-row INSERT
   transactions with the trigger and with it disabled (interleaved rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Timer,
    bench_args,
    print_table,
    scratch_database,
    server,
    summarize,
    write_results,
)

from pgflow.log.cursors import (
    BatchOutcome,
    Consumer,
    CursorKey,
    consume_once,
    ensure_cursor,
)
from pgflow.log.events import Event, NewEvent, append
from pgflow.log.listener import Listener, Notifier
from pgflow.log.snapshots import diff_read_sql
from pgflow.log.streamer import Filter

GOALS = {
    "tail_events_per_s": 50_000,
    "tail_vs_raw": 0.8,
    "held_p50_ratio": 1.5,
    "notify_p50_ms": 5.0,
    "notify_p99_ms": 25.0,
    "writer_ratio": 0.9,
}
BATCH = 500
WRITERS = 32
POLL_ONLY_INTERVAL = 0.1


async def _pool(dsn: str, size: int = 2) -> Any:
    from psycopg_pool import AsyncConnectionPool

    pool: Any = AsyncConnectionPool(dsn, min_size=1, max_size=size, open=False)
    await pool.open(wait=True)
    return pool


# --------------------------------------------------------------------------- (a) tail


async def _preload(dsn: str, stream: str, n: int, per_tx: int = 1000) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for start in range(0, n, per_tx):
            await conn.execute(
                "INSERT INTO pgflow.events (stream, type, foreign_id)"
                " SELECT %s, 'created', 'run-' || g FROM generate_series(%s::int, %s::int) g",
                (stream, start, min(start + per_tx, n) - 1),
            )
        await conn.execute("ANALYZE pgflow.events")


async def bench_tail(dsn: str, n: int) -> dict[str, Any]:
    """Consume an ``n``-event backlog of one shard: pgflow vs hand-written psycopg."""
    import psycopg

    await _preload(dsn, "tail", n)
    pool = await _pool(dsn)
    try:
        key, flt = CursorKey("tail"), Filter("tail")
        async with pool.connection() as conn:
            await ensure_cursor(conn, key, flt)
        seen = 0

        async def handler(events: list[Event], conn: Any) -> None:
            nonlocal seen
            seen += len(events)

        with Timer() as t_pgflow:
            while True:
                r = await consume_once(pool, key, flt, handler, batch_size=BATCH)
                if r.outcome is not BatchOutcome.APPLIED:
                    break
        assert seen == n, (seen, n)

        # The same statements, hand-written: tuples, no Event objects, no helpers.
        read = diff_read_sql(
            relation="pgflow.events",
            columns="e.id, e.tx, e.stream, e.type, e.foreign_id, e.run_id, e.version,"
            " e.shard_hash, e.headers, e.traceparent, e.created_at",
            where=["e.stream = %(stream)s"],
        )
        raw_seen = 0
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            await conn.execute(
                "INSERT INTO pgflow.cursors (consumer, shard, shard_count, stream)"
                " VALUES ('raw', 0, 1, 'tail')"
            )
            await conn.commit()
            with Timer() as t_raw:
                while True:
                    async with conn.transaction():
                        await conn.execute(
                            "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))",
                            ("raw",),
                        )
                        cur = await conn.execute(
                            "SELECT snap::text, upto::text, after_id, lo, hi FROM pgflow.cursors"
                            " WHERE consumer = 'raw' AND shard = 0 AND shard_count = 1"
                        )
                        old = await cur.fetchone()
                        assert old is not None
                        cur = await conn.execute(
                            read,
                            {
                                "stream": "tail",
                                "__s1": old[0],
                                "__upto": old[1],
                                "__after": old[2],
                                "__lo": old[3],
                                "__hi": old[4],
                                "__limit": BATCH + 1,
                            },
                        )
                        rows = await cur.fetchall()
                        if not rows:
                            break
                        more = len(rows) > BATCH
                        rows = rows[:BATCH]
                        raw_seen += len(rows)
                        s2, lo, hi, last = rows[0][0], rows[0][1], rows[0][2], rows[-1][3]
                        new = (old[0], s2, last, lo, hi) if more else (s2, None, 0, None, None)
                        await conn.execute(
                            "UPDATE pgflow.cursors SET snap = %s::pg_snapshot,"
                            " upto = %s::pg_snapshot, after_id = %s, lo = %s, hi = %s,"
                            " updated_at = now() WHERE consumer = 'raw' AND shard = 0"
                            " AND shard_count = 1 AND snap::text = %s"
                            " AND upto::text IS NOT DISTINCT FROM %s AND after_id = %s",
                            (*new, old[0], old[1], old[2]),
                        )
        assert raw_seen == n, (raw_seen, n)
    finally:
        await pool.close()
    pgflow_rate = n / t_pgflow.seconds
    raw_rate = n / t_raw.seconds
    return {
        "events": n,
        "batch_size": BATCH,
        "pgflow_seconds": t_pgflow.seconds,
        "pgflow_events_per_s": pgflow_rate,
        "raw_seconds": t_raw.seconds,
        "raw_events_per_s": raw_rate,
        "pgflow_vs_raw": pgflow_rate / raw_rate,
    }


async def bench_stamp_trigger(dsn: str, n: int, rounds: int = 3) -> dict[str, Any]:
    """What the trigger that stamps ``tx`` (so it cannot be forged) costs a writer:
    single-row INSERT transactions with it and with it disabled, interleaved."""
    import psycopg

    timings: dict[str, list[float]] = {"with": [], "without": []}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for r in range(rounds):
            for variant in ("with", "without"):
                action = "ENABLE" if variant == "with" else "DISABLE"
                await conn.execute(f"ALTER TABLE pgflow.events {action} TRIGGER stamp_tx")
                with Timer() as t:
                    for i in range(n):
                        await conn.execute(
                            "INSERT INTO pgflow.events (stream, type, foreign_id)"
                            " VALUES ('stamp', 't', %s)",
                            (f"{variant}-{r}-{i}",),
                        )
                timings[variant].append(t.seconds)
        await conn.execute("ALTER TABLE pgflow.events ENABLE TRIGGER stamp_tx")
    with_rate = n * rounds / sum(timings["with"])
    without_rate = n * rounds / sum(timings["without"])
    return {
        "inserts": n * rounds,
        "with_per_s": with_rate,
        "without_per_s": without_rate,
        "ratio": with_rate / without_rate,
    }


async def bench_catchup(dsn: str, n: int) -> dict[str, Any]:
    """Consume an ``n``-event backlog from the start of the log with ``consume_once``."""
    await _preload(dsn, "catchup", n, per_tx=5000)
    pool = await _pool(dsn)
    seen = batches = 0

    async def handler(events: list[Event], conn: Any) -> None:
        nonlocal seen
        seen += len(events)

    try:
        key, flt = CursorKey("catchup"), Filter("catchup")
        async with pool.connection() as conn:
            await ensure_cursor(conn, key, flt)
        with Timer() as t:
            while True:
                r = await consume_once(pool, key, flt, handler, batch_size=BATCH)
                if r.outcome is not BatchOutcome.APPLIED:
                    break
                batches += 1
    finally:
        await pool.close()
    assert seen == n, (seen, n)
    return {"events": n, "batches": batches, "seconds": t.seconds, "events_per_s": n / t.seconds}


# ------------------------------------------------------------------------ (b) latency


def _other_database(dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params["dbname"] = "postgres"
    return make_conninfo("", **params)


async def bench_latency(
    dsn: str, mode: str, seconds: float, *, held_elsewhere: bool = False
) -> dict[str, Any]:
    """Commit -> handler latency; ``mode`` is ``notify``, ``poke`` or ``poll``.

    ``held_elsewhere``: a session in another database holds a transaction with an xid
    open for the whole phase."""
    import psycopg

    holder = None
    if held_elsewhere:
        holder = await psycopg.AsyncConnection.connect(_other_database(dsn))
        await holder.execute("SELECT pg_current_xact_id()")
    try:
        return await _latency(dsn, mode, seconds, f"lat_{mode}{'_held' if holder else ''}")
    finally:
        if holder is not None:
            await holder.close()


async def _latency(dsn: str, mode: str, seconds: float, stream: str) -> dict[str, Any]:
    wpool = await _pool(dsn)
    cpool = await _pool(dsn)
    listener = Listener(dsn) if mode != "poll" else None
    if listener is not None:
        await listener.start()
    # notify: the wake-up must travel through Postgres (no in-process shortcut);
    # poke: the notifier also wakes local subscribers directly.
    notifier = Notifier(wpool, listener if mode == "poke" else None)
    notifier.start()
    committed_at: dict[int, float] = {}
    latencies: list[float] = []

    async def handler(events: list[Event], conn: Any) -> None:
        now = time.perf_counter()
        for e in events:
            t0 = committed_at.get(e.id)
            if t0 is not None:
                latencies.append((now - t0) * 1000.0)

    consumer = Consumer(
        cpool,
        CursorKey(stream),
        Filter(stream),
        handler,
        listener=listener,
        poll_interval=POLL_ONLY_INTERVAL if mode == "poll" else 1.0,
    )
    task = asyncio.create_task(consumer.run())
    written = 0
    try:
        async with wpool.connection() as conn:
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                [event_id] = await append(conn, [NewEvent(stream, "created", f"r{written}")])
                await conn.commit()
                committed_at[event_id] = time.perf_counter()
                if mode != "poll":
                    notifier.poke(stream)
                written += 1
                await asyncio.sleep(0.005)
        drain_deadline = time.perf_counter() + 5
        while len(latencies) < written and time.perf_counter() < drain_deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    finally:
        consumer.stop()
        await task
        await notifier.stop()
        if listener is not None:
            await listener.stop()
        await wpool.close()
        await cpool.close()
    stats = summarize(latencies)
    return {
        "mode": mode,
        "poll_interval_s": consumer.poll_interval,
        "written": written,
        "received": len(latencies),
        **{f"{k}_ms": v for k, v in stats.items() if k != "count"},
    }


# ------------------------------------------------------------------------ (c) writers


async def _writers_child(
    dsn: str, mode: str, seconds: float, writers: int, stream: str
) -> dict[str, Any]:
    """Run in a child process: ``writers`` connections committing one-event txs."""
    import psycopg

    conns = [await psycopg.AsyncConnection.connect(dsn) for _ in range(writers)]
    pool = await _pool(dsn) if mode == "poke" else None
    notifier = Notifier(pool) if pool is not None else None
    if notifier is not None:
        notifier.start()
    counts = [0] * writers
    stop = asyncio.Event()

    async def write(i: int, conn: Any) -> None:
        n = 0
        while not stop.is_set():
            await append(conn, [NewEvent(stream, "created", f"w{i}-{n}")])
            if mode == "notify_in_tx":
                await conn.execute("SELECT pg_notify('pgflow_events', %s)", (stream,))
            await conn.commit()
            if notifier is not None:
                notifier.poke(stream)
            n += 1
            counts[i] = n

    tasks = [asyncio.create_task(write(i, c)) for i, c in enumerate(conns)]
    await asyncio.sleep(0.5)  # warm-up, not measured
    start_counts, t0 = sum(counts), time.perf_counter()
    await asyncio.sleep(seconds)
    done, elapsed = sum(counts) - start_counts, time.perf_counter() - t0
    stop.set()
    await asyncio.gather(*tasks)
    if notifier is not None:
        await notifier.stop()
        print(json.dumps({"notifications": notifier.sent}), file=sys.stderr)
    if pool is not None:
        await pool.close()
    for c in conns:
        await c.close()
    return {"commits": done, "seconds": elapsed, "tps": done / elapsed}


async def bench_writers(
    dsn: str,
    seconds: float,
    with_consumer: bool,
    mode: str,
    stream: str,
    *,
    listen_only: bool = False,
) -> dict[str, Any]:
    """Writers in a child process; optionally a Listener + Consumer in this one
    (``listen_only``: the Listener and its wake-ups, without a consumer reading).

    Each run writes its own ``stream``, so the consumer starts at the head instead of
    catching up on earlier runs' events while the writers are being measured.
    """
    listener = consumer = task = cpool = None
    consumed = 0
    outcomes: dict[str, int] = {}
    if with_consumer:
        cpool = await _pool(dsn)
        listener = Listener(dsn)
        await listener.start()

        async def handler(events: list[Event], conn: Any) -> None:
            nonlocal consumed
            consumed += len(events)

        def count(result: Any) -> None:
            outcomes[result.outcome.value] = outcomes.get(result.outcome.value, 0) + 1

        if listen_only:
            sub = listener.subscribe(stream)

            async def count_wakeups() -> None:
                while True:
                    if await sub.wait(1.0):
                        outcomes["wakeups"] = outcomes.get("wakeups", 0) + 1

            task = asyncio.create_task(count_wakeups())
        else:
            consumer = Consumer(
                cpool,
                CursorKey(stream),
                Filter(stream),
                handler,
                listener=listener,
                on_batch=count,
            )
            task = asyncio.create_task(consumer.run())
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--dsn",
            dsn,
            "--child-writers",
            mode,
            "--child-seconds",
            str(seconds),
            "--child-stream",
            stream,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"writer process failed ({proc.returncode})")
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        if consumer is not None and task is not None:
            consumer.stop()
            await task
        elif task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if listener is not None:
            await listener.stop()
        if cpool is not None:
            await cpool.close()
    result.update(mode=mode, consumer=with_consumer, consumed=consumed, batches=outcomes)
    return result


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the rounds of one variant; tps over the total measured time."""
    commits = sum(r["commits"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {
        **runs[0],
        "commits": commits,
        "seconds": seconds,
        "tps": commits / seconds,
        "consumed": sum(r["consumed"] for r in runs),
        "rounds_tps": [r["tps"] for r in runs],
    }


# ---------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = 2.0 if args.quick else 10.0
    n_tail = 20_000 if args.quick else 200_000
    async with scratch_database(args.dsn) as dsn:
        print(f"server: {args.server_label}", flush=True)
        print(f"(a) tail throughput: {n_tail:,} events, batch {BATCH}", flush=True)
        tail = await bench_tail(dsn, n_tail)
        n_catchup = 50_000 if args.quick else 1_000_000
        print(f"(a) catch-up: {n_catchup:,} events, batch {BATCH}", flush=True)
        catchup = await bench_catchup(dsn, n_catchup)
        latency = []
        for mode in ("notify", "poke", "poll"):
            print(f"(b) latency via {mode}: {seconds:g} s", flush=True)
            latency.append(await bench_latency(dsn, mode, seconds))
        print(f"(b) latency via notify, xid held in another database: {seconds:g} s", flush=True)
        held = await bench_latency(dsn, "notify", seconds, held_elsewhere=True)
        # Interleaved rounds, so drift (table growth, autovacuum, other load on the
        # machine) hits every variant alike instead of whichever runs last.
        rounds = 1 if args.quick else 3
        each = seconds / rounds
        print(f"(c) {WRITERS} writers: {rounds} x 3 x {each:g} s", flush=True)
        variants = ("plain", "listen", "poke", "notify_in_tx")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for r in range(rounds):
            for variant in variants:
                stream = f"writers_{variant}_{r}"
                mode = "poke" if variant == "listen" else variant
                runs[variant].append(
                    await bench_writers(
                        dsn,
                        each,
                        variant != "plain",
                        mode,
                        stream,
                        listen_only=variant == "listen",
                    )
                )
        alone, listening, together, bad = (_merge(runs[v]) for v in variants)
        n_stamp = 500 if args.quick else 5_000
        print(f"(d) tx-stamping trigger: {n_stamp:,} insert transactions x 3", flush=True)
        stamp = await bench_stamp_trigger(dsn, n_stamp)
    writers = {
        "writers": WRITERS,
        "alone": alone,
        "with_listener": listening,
        "listener_ratio": listening["tps"] / alone["tps"],
        "with_listener_consumer": together,
        "notify_in_tx": bad,
        "ratio": together["tps"] / alone["tps"],
        "notify_in_tx_ratio": bad["tps"] / alone["tps"],
    }
    notify = latency[0]
    rows: list[dict[str, Any]] = [
        {
            "metric": "(a) tail, pgflow consume_once",
            "value": tail["pgflow_events_per_s"],
            "unit": "events/s",
            "goal": f">= {GOALS['tail_events_per_s']:,}",
        },
        {"metric": "(a) tail, raw psycopg", "value": tail["raw_events_per_s"], "unit": "events/s"},
        {
            "metric": "(a) pgflow / raw",
            "value": tail["pgflow_vs_raw"],
            "unit": "ratio",
            "goal": f">= {GOALS['tail_vs_raw']}",
        },
        {
            "metric": f"(a) catch-up of {catchup['events']:,} events",
            "value": catchup["events_per_s"],
            "unit": "events/s",
            "goal": ">= tail",
        },
    ]
    for lat in latency:
        label = {
            "notify": "NOTIFY",
            "poke": "in-process poke",
            "poll": f"polling {POLL_ONLY_INTERVAL:g}s",
        }[lat["mode"]]
        for p in ("p50", "p99"):
            row = {"metric": f"(b) latency {label} {p}", "value": lat[f"{p}_ms"], "unit": "ms"}
            if lat["mode"] == "notify":
                row["goal"] = f"<= {GOALS[f'notify_{p}_ms']:g}"
            rows.append(row)
    for p in ("p50", "p99"):
        rows.append(
            {
                "metric": f"(b) latency NOTIFY, xid held elsewhere, {p}",
                "value": held[f"{p}_ms"],
                "unit": "ms",
            }
        )
    held_ratio = held["p50_ms"] / notify["p50_ms"]
    rows.append(
        {
            "metric": "(b) held / not held p50",
            "value": held_ratio,
            "unit": "ratio",
            "goal": f"<= {GOALS['held_p50_ratio']}",
        }
    )
    rows += [
        {"metric": "(c) writers alone", "value": alone["tps"], "unit": "tx/s"},
        {"metric": "(c) writers + listener (wake-ups)", "value": listening["tps"], "unit": "tx/s"},
        {
            "metric": "(c) ratio listener/without",
            "value": writers["listener_ratio"],
            "unit": "ratio",
            "goal": f">= {GOALS['writer_ratio']}",
        },
        {"metric": "(c) writers + listener + consumer", "value": together["tps"], "unit": "tx/s"},
        {
            "metric": "(c) ratio listener+consumer/without",
            "value": writers["ratio"],
            "unit": "ratio",
        },
        {"metric": "(c) pg_notify in each write tx", "value": bad["tps"], "unit": "tx/s"},
        {
            "metric": "(c) ratio pg_notify-in-tx/alone",
            "value": writers["notify_in_tx_ratio"],
            "unit": "ratio",
        },
        {"metric": "(d) inserts, tx-stamping trigger on", "value": stamp["with_per_s"],
         "unit": "tx/s"},
        {"metric": "(d) inserts, trigger disabled", "value": stamp["without_per_s"],
         "unit": "tx/s"},
        {"metric": "(d) ratio on/off", "value": stamp["ratio"], "unit": "ratio"},
    ]
    met = {
        "tail_events_per_s": tail["pgflow_events_per_s"] >= GOALS["tail_events_per_s"],
        "tail_vs_raw": tail["pgflow_vs_raw"] >= GOALS["tail_vs_raw"],
        "catchup_vs_tail": catchup["events_per_s"] >= tail["pgflow_events_per_s"],
        "held_p50_ratio": held_ratio <= GOALS["held_p50_ratio"],
        "notify_p50_ms": notify["p50_ms"] <= GOALS["notify_p50_ms"],
        "notify_p99_ms": notify["p99_ms"] <= GOALS["notify_p99_ms"],
        "writer_ratio": writers["listener_ratio"] >= GOALS["writer_ratio"],
    }
    for row in rows:
        row.setdefault("goal", "")
    print()
    print_table(rows, ["metric", "value", "unit", "goal"])
    return {
        "quick": args.quick,
        "server": args.server_label,
        "phase_seconds": seconds,
        "goals": GOALS,
        "goals_met": met,
        "tail": tail,
        "catchup": catchup,
        "latency": latency,
        "latency_held_elsewhere": held,
        "writers": writers,
        "stamp_trigger": stamp,
        "table": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--child-writers", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--child-stream", default="writers", help=argparse.SUPPRESS)
    args = bench_args("stream benchmark", argv, parser)
    if args.child_writers:
        result = asyncio.run(
            _writers_child(
                args.dsn, args.child_writers, args.child_seconds, WRITERS, args.child_stream
            )
        )
        print(json.dumps(result))
        return 0
    with server(args) as dsn:
        args.server_label = "private cluster" if args.private_server else "shared (--dsn)"
        args.dsn = dsn
        results = asyncio.run(run(args))
    path = write_results("stream", results, path=args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
