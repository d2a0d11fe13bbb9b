"""Randomised end-to-end check of the exactly-once, gap-free guarantee under faults.

Writers commit or roll back at random (sometimes holding their transaction open for a
moment, so commits land out of id order); sharded consumers — two competing instances
per shard, each with its own pool — apply every event into an effects table inside
the batch transaction, while a killer terminates their connections. At the end the
applied set must equal the committed set, with no duplicate, and every cursor must
only ever have moved forwards.

Seeded (``PGFLOW_RANDOM_SEED`` overrides) and bounded: ~4 s of writing by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import defaultdict
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from pgflow.log.cursors import Consumer, CursorKey
from pgflow.log.events import Event, NewEvent, append, shard_hash
from pgflow.log.listener import Listener, Notifier
from pgflow.log.snapshots import CONSUMED
from pgflow.log.streamer import Filter
from tests._util import wait_until

Conn = AsyncConnection[Any]
Pool = AsyncConnectionPool[Conn]

SEED = int(os.environ.get("PGFLOW_RANDOM_SEED", "20240611"))
WRITE_SECONDS = float(os.environ.get("PGFLOW_RANDOM_SECONDS", "4"))
WRITERS = 4
SHARDS = 3
INSTANCES_PER_SHARD = 2
CONSUMER_APP = "rand-consumer"


async def test_random_writers_consumers_and_kills(pgflow_dsn: str) -> None:
    rng = random.Random(SEED)
    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as admin:
        await admin.execute(
            "CREATE TABLE effects (event_id bigint PRIMARY KEY, shard int NOT NULL,"
            " foreign_id text NOT NULL)"
        )

    committed: set[int] = set()
    rolled_back: set[int] = set()
    duplicates: list[int] = []
    stop_writing = asyncio.Event()
    stop_killing = asyncio.Event()

    notify_pool: Pool = AsyncConnectionPool(pgflow_dsn, min_size=1, max_size=2, open=False)
    await notify_pool.open(wait=True)
    listener = Listener(pgflow_dsn)
    await listener.start()
    notifier = Notifier(notify_pool, listener)
    notifier.start()

    def handler_for(shard: int) -> Any:
        async def apply(events: list[Event], conn: Conn) -> None:
            for e in events:
                try:
                    async with conn.transaction():  # savepoint: see the violation
                        await conn.execute(
                            "INSERT INTO effects VALUES (%s, %s, %s)", (e.id, shard, e.foreign_id)
                        )
                except psycopg.errors.UniqueViolation:
                    duplicates.append(e.id)
                    raise

        return apply

    pools: list[Pool] = []
    consumers: list[Consumer] = []
    for shard in range(SHARDS):
        for _ in range(INSTANCES_PER_SHARD):
            p: Pool = AsyncConnectionPool(
                make_conninfo(pgflow_dsn, application_name=CONSUMER_APP),
                min_size=1,
                max_size=2,
                open=False,
            )
            await p.open(wait=True)
            pools.append(p)
            consumers.append(
                Consumer(
                    p,
                    CursorKey("rand", shard, SHARDS),
                    Filter("s", shard=shard, shard_count=SHARDS),
                    handler_for(shard),
                    listener=listener,
                    batch_size=rng.choice([1, 5, 50]),
                    poll_interval=0.2,
                    max_backoff=0.2,
                )
            )

    async def writer(n: int) -> None:
        wrng = random.Random(SEED * 100 + n)
        async with await AsyncConnection.connect(pgflow_dsn) as conn:
            while not stop_writing.is_set():
                events = [
                    NewEvent("s", "t", f"run-{wrng.randrange(40)}")
                    for _ in range(wrng.randint(1, 4))
                ]
                ids = await append(conn, events)
                if wrng.random() < 0.3:  # hold the transaction open: out-of-order commits
                    await asyncio.sleep(wrng.random() * 0.02)
                if wrng.random() < 0.2:
                    await conn.rollback()
                    rolled_back.update(ids)
                else:
                    await conn.commit()
                    committed.update(ids)
                    notifier.poke("s")
                await asyncio.sleep(wrng.random() * 0.005)

    async def killer() -> None:
        krng = random.Random(SEED + 7)
        async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
            while not stop_killing.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_killing.wait(), krng.uniform(0.1, 0.4))
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                    " application_name = %s AND datname = current_database()"
                    " AND pid <> pg_backend_pid() AND random() < 0.5",
                    (CONSUMER_APP,),
                )

    # Per shard, how many events its cursor has read, sampled over time: a cursor that
    # moved back would read fewer (events are never deleted here).
    history: dict[int, list[int]] = defaultdict(list)

    async def sampler() -> None:
        async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT c.shard, (SELECT count(*) FROM pgflow.events e WHERE e.stream ="
                    f" c.stream AND {CONSUMED}) FROM pgflow.cursors c WHERE c.consumer = 'rand'"
                )
                for shard, read in await cur.fetchall():
                    if not history[shard] or history[shard][-1] != read:
                        history[shard].append(int(read))
                await asyncio.sleep(0.01)

    consumer_tasks = [asyncio.create_task(c.run()) for c in consumers]
    sampler_task = asyncio.create_task(sampler())
    killer_task = asyncio.create_task(killer())
    writer_tasks = [asyncio.create_task(writer(n)) for n in range(WRITERS)]
    try:
        await asyncio.sleep(WRITE_SECONDS)  # the workload's duration, not an assertion
        stop_writing.set()
        await asyncio.gather(*writer_tasks)
        stop_killing.set()
        await killer_task

        async def applied_all() -> bool:
            async with await AsyncConnection.connect(pgflow_dsn) as conn:
                cur = await conn.execute("SELECT count(*) FROM effects")
                return int((await cur.fetchone() or [0])[0]) >= len(committed)

        await wait_until(applied_all, timeout=20, message="all committed events applied")
        async with await AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute("SELECT event_id, shard, foreign_id FROM effects")
            rows = await cur.fetchall()
    finally:
        stop_writing.set()
        stop_killing.set()
        for c in consumers:
            c.stop()
        await asyncio.wait_for(asyncio.gather(*consumer_tasks, return_exceptions=True), 15)
        sampler_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler_task
        await notifier.stop()
        await listener.stop()
        for p in pools:
            await p.close()
        await notify_pool.close()

    applied = [r[0] for r in rows]
    assert len(committed) > 100, "the workload should have committed a fair amount"
    assert rolled_back, "the workload should have rolled some transactions back"
    assert duplicates == []
    assert len(applied) == len(set(applied))
    assert set(applied) == committed
    for _, shard, foreign_id in rows:
        assert shard_hash(foreign_id) % SHARDS == shard
    kills = sum(c.errors for c in consumers)
    assert kills > 0, "the killer should have hit some consumer connections"
    for shard, positions in history.items():
        assert positions == sorted(positions), f"shard {shard} cursor moved backwards"
        assert len(positions) > 1
