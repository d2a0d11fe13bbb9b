"""Shared pieces of the console tests: a seeded database, the orders graph, a live server."""

from __future__ import annotations

import enum
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import uvicorn

import pgflow
from pgflow.testing import run_sync
from tests.test_views import build_scenario

TOKEN = "s3cret-token-for-tests"


class Status(enum.StrEnum):
    CREATED = "CREATED"
    PAID = "PAID"
    SHIPPED = "SHIPPED"
    REJECTED = "REJECTED"


async def charge(run: Any) -> None:
    return None


async def ship(run: Any) -> None:
    return None


def orders_builder() -> pgflow.Builder[Any, Any]:
    """The graph of the seeded "orders" runs (never run: only drawn)."""
    b: pgflow.Builder[Any, Any] = pgflow.Builder("orders", dict, Status)
    b.add_step(Status.CREATED, charge, Status.PAID, Status.REJECTED)
    b.add_step(Status.PAID, ship, Status.SHIPPED)
    return b


async def _seed(dsn: str) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        ids: dict[str, Any] = dict(await build_scenario(conn))
        await conn.execute(
            "UPDATE pgflow.records SET last_error = %s WHERE run_id = %s",
            [
                'Traceback (most recent call last):\n  File "shop.py", line 3, in charge\n'
                "ValueError: card declined",
                ids["orders/order-2"],
            ],
        )
        cur = await conn.execute(
            "INSERT INTO pgflow.dead_letters (consumer, event_id, foreign_id, type, payload,"
            " headers, reason, attempts) VALUES ('orders--payments', 'evt-77', 'order-2',"
            ' \'payment\', \'{"amount": 12, "card": "4242"}\', \'{"source": "psp"}\','
            " 'ValueError: card declined (after 5 attempts)', 5) RETURNING id"
        )
        row = await cur.fetchone()
        assert row is not None
        ids["dead_letter"] = row[0]
        await conn.execute(
            "INSERT INTO pgflow.cursors (consumer, shard, shard_count, stream, types)"
            " VALUES ('orders-CREATED', 0, 2, 'orders', ARRAY['CREATED']),"
            " ('orders-CREATED', 1, 2, 'orders', ARRAY['CREATED'])"
        )
        return ids


def seed(dsn: str) -> dict[str, Any]:
    """Runs from ``tests.test_views.build_scenario`` (order-2 erroring with a traceback,
    order-3 paused, ...), one pending dead letter for order-2, two consumer shards."""
    return run_sync(_seed(dsn))


def new_run(dsn: str, foreign_id: str, workflow: str = "orders") -> uuid.UUID:
    from pgflow.workflow.records import insert_run

    async def go() -> uuid.UUID:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            rid = uuid.uuid4()
            await insert_run(
                conn, workflow=workflow, foreign_id=foreign_id, run_id=rid, status="CREATED",
                object_json='{"amount": 1}',
            )  # fmt: skip
            return rid

    return run_sync(go())


def record(dsn: str, run_id: Any) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute("SELECT * FROM pgflow.records WHERE run_id = %s", [run_id])
        names = [d.name for d in cur.description or ()]
        row = cur.fetchone()
        assert row is not None
        return dict(zip(names, row, strict=True))


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("console server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
