"""Connectors driving real workflows through ``Builder.add_connector`` (the seed's
payment → order example in :mod:`pgflow.demo`, plus exactly-once checks)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from decimal import Decimal
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow import run_id_for
from pgflow.connectors import ConnectorEvent, table, webhook
from pgflow.connectors.capture import changes_stream, make_change_translator
from pgflow.connectors.memory import Connector as MemoryConnector
from pgflow.connectors.memory import event
from pgflow.demos.orders import (
    CONNECTOR,
    DEAD_LETTER_CONSUMER,
    HIGH_VALUE_THRESHOLD,
    WORKFLOW,
    Order,
    PaymentRejected,
    Status,
    build_orders,
    handle_payment,
)
from pgflow.log.snapshots import CONSUMED
from tests._util import wait_until


def pay(n: int, order: str, kind: str = "payment.completed", **headers: str) -> ConnectorEvent:
    headers = {"amount": "10.00", "currency": "EUR", **headers}
    return event(f"pay-{n}", order, kind, **{k: v for k, v in headers.items() if v})


# -- the connector function alone, against a fake API --------------------------------


class FakeAPI:
    """Just enough of the workflow API for handle_payment (not a database mock)."""

    def __init__(self, known: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.known = set(known)
        self.triggered: list[tuple[str, Order, Status, str]] = []

    async def exists(self, foreign_id: str) -> bool:
        return foreign_id in self.known

    async def trigger(
        self, foreign_id: str, initial: Order, start_at: Status, *, run_id: str
    ) -> str:
        self.triggered.append((foreign_id, initial, start_at, run_id))
        return run_id


async def test_handle_payment_unit() -> None:
    api = FakeAPI(known={"o-known"})
    await handle_payment(api, pay(1, "o1", amount="12.5"))  # type: ignore[arg-type]
    [(fid, order, status, rid)] = api.triggered
    assert (fid, order.amount, order.currency, status) == (
        "o1",
        "12.5",
        "EUR",
        Status.PAYMENT_COMPLETED,
    )
    assert rid == run_id_for(CONNECTOR, "pay-1")
    api.triggered.clear()
    await handle_payment(api, pay(2, "o2", amount=str(HIGH_VALUE_THRESHOLD + 1)))  # type: ignore[arg-type]
    await handle_payment(api, pay(3, "o-unknown", "payment.refunded"))  # type: ignore[arg-type]
    await handle_payment(api, pay(4, "o4", "shipment.created"))  # type: ignore[arg-type]
    assert api.triggered == []
    await handle_payment(api, pay(5, "o-known", "payment.refunded"))  # type: ignore[arg-type]
    await handle_payment(api, pay(6, "o6", "payment.failed"))  # type: ignore[arg-type]
    assert [t[2] for t in api.triggered] == [Status.REFUNDED, Status.PAYMENT_FAILED]
    for bad, reason in [
        ({"amount": ""}, "missing header 'amount'"),
        ({"amount": "ten"}, "not a number"),
        ({"amount": "-1"}, "positive"),
        ({"currency": "eur"}, "ISO 4217"),
    ]:
        with pytest.raises(PaymentRejected, match=reason):
            await handle_payment(api, pay(7, "o7", **bad))  # type: ignore[arg-type]


# -- through the engine ------------------------------------------------------------


async def reach(wf: Any, foreign_id: str, run_id: str, status: Status) -> Any:
    """Wait for the run to exist (the connector creates it), then to reach ``status``."""

    async def started() -> bool:
        try:
            await wf.get(foreign_id, run_id)
            return True
        except pgflow.NotFound:
            return False

    await wait_until(started, timeout=30, message=f"run of {foreign_id}")
    return await wf.wait_for(foreign_id, run_id, status, timeout=30)


async def _scalar(dsn: str, sql: str, *params: Any) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(sql, params)
        row = await cur.fetchone()
        return row[0] if row else None


async def test_memory_connector_triggers_runs(pgflow_dsn: str) -> None:
    memory = MemoryConnector(
        [pay(1, "order-1", amount="99.90"), pay(2, "order-2", "payment.failed")]
    )
    async with build_orders(pgflow_dsn, memory) as wf:
        rid = run_id_for(CONNECTOR, "pay-1")
        rec = await reach(wf, "order-1", rid, Status.PAYMENT_COMPLETED)  # its initial status
        assert rec.object.amount == "99.90"
        done = await reach(wf, "order-1", rid, Status.FULFILLED)
        assert done.run_state == pgflow.RunState.COMPLETED and done.object.notes == ["shipped"]
        await reach(wf, "order-2", run_id_for(CONNECTOR, "pay-2"), Status.CUSTOMER_NOTIFIED)
        await wait_until(lambda: _acked(memory, 2), timeout=30, message="both acked")


async def test_filtering_idempotency_and_refunds(pgflow_dsn: str) -> None:
    events = [
        pay(1, "order-1"),
        pay(2, "big", amount="10000.01"),  # filtered: high value
        pay(1, "order-1"),  # redelivered: same event id, same run
        pay(3, "nobody", "payment.refunded"),  # refund of an unknown order: ignored
    ]
    memory = MemoryConnector(events)
    async with build_orders(pgflow_dsn, memory) as wf:
        await wait_until(lambda: _acked(memory, 4), timeout=30, message="all events acked")
        await reach(wf, "order-1", run_id_for(CONNECTOR, "pay-1"), Status.FULFILLED)
        memory.append(pay(4, "order-1", "payment.refunded"))
        await reach(wf, "order-1", run_id_for(CONNECTOR, "pay-4"), Status.REFUND_RECORDED)
        assert not await wf.exists("big") and not await wf.exists("nobody")
    runs = await _scalar(
        pgflow_dsn, "SELECT count(*) FROM pgflow.records WHERE foreign_id = 'order-1'"
    )
    assert runs == 2  # the payment and the refund; the duplicate added nothing


async def _acked(
    memory: MemoryConnector, n: int, name: str = f"{WORKFLOW}--{CONNECTOR}-1-of-1"
) -> bool:
    return memory.position(name) >= n


async def test_validation_errors_are_retried_then_dead_lettered(pgflow_dsn: str) -> None:
    memory = MemoryConnector([pay(1, "bad", amount=""), pay(2, "good")])
    async with build_orders(pgflow_dsn, memory, max_retries=3) as wf:
        await reach(wf, "good", run_id_for(CONNECTOR, "pay-2"), Status.FULFILLED)
        await wait_until(
            lambda: _acked(memory, 2), timeout=30, message="bad event acked after dead-lettering"
        )
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        cur = await conn.execute(
            "SELECT consumer, event_id, foreign_id, type, reason, attempts, headers"
            " FROM pgflow.dead_letters"
        )
        [(consumer, event_id, fid, kind, reason, attempts, headers)] = await cur.fetchall()
    assert (consumer, event_id, fid, kind, attempts) == (
        DEAD_LETTER_CONSUMER,  # "orders--payment-processor": scoped to the workflow
        "pay-1",
        "bad",
        "payment.completed",
        3,
    )
    assert "missing header 'amount'" in reason and headers == {"currency": "EUR"}


async def test_parallel_count_3_exactly_once_in_order(pgflow_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE seen (n bigint GENERATED ALWAYS AS IDENTITY, event_id text,"
            " foreign_id text, seq int)"
        )
    events = [event(f"e{i}", f"acct-{i % 7}", "t", seq=str(i)) for i in range(210)]
    memory = MemoryConnector(events)

    async def record(api: Any, ev: ConnectorEvent) -> None:
        await asyncio.sleep(0)  # let the three shards interleave
        await api.conn.execute(
            "INSERT INTO seen (event_id, foreign_id, seq) VALUES (%s, %s, %s)",
            (ev.id, ev.foreign_id, int(ev.headers["seq"])),
        )

    b: pgflow.Builder[Order, Status] = pgflow.Builder("par", Order, Status)
    b.add_step(Status.PAYMENT_COMPLETED, lambda run: Status.FULFILLED, Status.FULFILLED)
    b.add_connector("feed", memory, record, parallel_count=3, polling_frequency=0.05)
    async with b.build(pgflow_dsn):
        await wait_until(
            lambda: _all_acked(memory), timeout=30, message="every shard consumed everything"
        )
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        cur = await conn.execute("SELECT count(*), count(DISTINCT event_id) FROM seen")
        assert await cur.fetchone() == (210, 210)
        cur = await conn.execute(
            "SELECT foreign_id, array_agg(seq ORDER BY n) FROM seen GROUP BY 1"
        )
        for _fid, seqs in await cur.fetchall():
            assert seqs == sorted(seqs) and len(seqs) == 30


async def _all_acked(memory: MemoryConnector) -> bool:
    return all(memory.position(f"par--feed-{i}-of-3") == 210 for i in (1, 2, 3))


APP_SCHEMA = """
CREATE SCHEMA app;
CREATE TABLE app.payments (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id text NOT NULL,
    status text NOT NULL,
    amount numeric,
    currency text NOT NULL DEFAULT 'EUR'
);
CREATE TABLE app.effects (event_id text NOT NULL);
"""


def payment_translator() -> Any:
    """payments table changes -> payment events: type from the row's status."""
    return make_change_translator(
        type=lambda c: f"payment.{c.row['status']}", foreign_id=lambda c: str(c.row["order_id"])
    )


async def test_captured_table_feeds_the_workflow_exactly_once(pgflow_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute(APP_SCHEMA)
    await pgflow.capture(pgflow_dsn, "app.payments")
    connector = table.Connector(
        changes_stream("app.payments"), table.CursorStore(pgflow_dsn), payment_translator()
    )
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO app.payments (order_id, status, amount) VALUES"
            " ('o1', 'completed', 10), ('o2', 'failed', 20), ('o3', 'completed', NULL)"
        )
    async with build_orders(pgflow_dsn, connector, max_retries=2) as wf:
        await reach(wf, "o1", run_id_for(CONNECTOR, "1"), Status.FULFILLED)
        await reach(wf, "o2", run_id_for(CONNECTOR, "2"), Status.CUSTOMER_NOTIFIED)
        async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
            await conn.execute("UPDATE app.payments SET status = 'refunded' WHERE order_id = 'o1'")
        await reach(wf, "o1", run_id_for(CONNECTOR, "4"), Status.REFUND_RECORDED)
        await wait_until(
            lambda: _scalar(pgflow_dsn, "SELECT count(*) FROM pgflow.dead_letters"),
            timeout=30,
            message="o3 (no amount) dead-lettered",
        )
    cursor = await _scalar(
        pgflow_dsn,
        "SELECT (SELECT max(e.id) FROM pgflow.changes e WHERE"
        f" {CONSUMED}) FROM pgflow.cursors c WHERE c.consumer = %s",
        f"connector:changes:app.payments:{WORKFLOW}--{CONNECTOR}-1-of-1",
    )
    assert cursor == 4  # the table cursor committed with the runs


async def test_webhook_feeds_the_workflow(pgflow_dsn: str) -> None:
    hook = webhook.Connector(pgflow_dsn, "payments")
    async with build_orders(pgflow_dsn, hook) as wf:
        body = json.dumps(
            {
                "id": "wh-1",
                "foreign_id": "o9",
                "type": "payment.completed",
                "headers": {"amount": "5.00", "currency": "GBP"},
            }
        ).encode()
        status = await _post(hook.url, body)
        assert status == 200
        assert await _post(hook.url, b'{"foreign_id": "o9"}') == 400
        rec = await reach(wf, "o9", run_id_for(CONNECTOR, "wh-1"), Status.FULFILLED)
        assert Decimal(rec.object.amount) == Decimal("5.00")
        assert await _post(hook.url, body) == 200  # the sender retries: no second run
        await wait_until(
            lambda: _scalar(
                pgflow_dsn,
                "SELECT lag_events = 0 FROM pgflow.consumer_lag WHERE consumer = %s",
                f"connector:webhook:payments:{WORKFLOW}--{CONNECTOR}-1-of-1",
            ),
            timeout=30,
            message="webhook stream consumed",
        )
    assert (
        await _scalar(pgflow_dsn, "SELECT count(*) FROM pgflow.records WHERE foreign_id = 'o9'")
        == 1
    )


async def _post(url: str, body: bytes) -> int:
    host, _, rest = url.removeprefix("http://").partition(":")
    port = int(rest.split("/", 1)[0])
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return int(raw.split(b" ", 2)[1])


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import pgflow
    from pgflow.connectors.capture import changes_stream
    from pgflow.connectors import table
    from pgflow.demos.orders import Order, Status

    async def effect(api, ev):
        await api.conn.execute("INSERT INTO app.effects VALUES (%s)", (ev.id,))

    async def main(dsn):
        b = pgflow.Builder("killed", Order, Status)
        b.add_step(Status.PAYMENT_COMPLETED, lambda run: Status.FULFILLED, Status.FULFILLED)
        src = table.Connector(changes_stream("app.payments"), table.CursorStore(dsn))
        b.add_connector("tail", src, effect, batch_size=20, polling_frequency=0.02)
        async with b.build(dsn):
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_table_connector_exactly_once_across_worker_sigkill(pgflow_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute(APP_SCHEMA)
    await pgflow.capture(pgflow_dsn, "app.payments")
    total = 900

    async def writer(k: int) -> None:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as c:
            for i in range(k, total, 3):
                await c.execute(
                    "INSERT INTO app.payments (order_id, status, amount)"
                    " VALUES (%s, 'completed', 1)",
                    (f"o{i}",),
                )

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, pgflow_dsn],
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )

    count = "SELECT count(*) FROM app.effects"
    first = spawn()
    writers = asyncio.gather(*(writer(k) for k in range(3)))
    try:
        await wait_until(lambda: _at_least(pgflow_dsn, count, 100), timeout=60, message="effects")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = spawn()
        try:
            await writers
            await wait_until(lambda: _at_least(pgflow_dsn, count, total), timeout=60, message="all")
        finally:
            second.kill()
            second.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        cur = await conn.execute("SELECT count(*), count(DISTINCT event_id) FROM app.effects")
        assert await cur.fetchone() == (total, total)


async def _at_least(dsn: str, sql: str, n: int) -> bool:
    return bool(await _scalar(dsn, sql) >= n)
