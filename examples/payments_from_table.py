"""Change data capture into a workflow: rows of an app's ``payments`` table start runs.

    python examples/payments_from_table.py [--dsn DSN]   # default: embedded PostgreSQL

1. ``pgflow.capture(dsn, "shop.payments")`` installs a row trigger that records every
   insert/update/delete of the table in ``pgflow.changes`` (in the app's transaction,
   no NOTIFY there).
2. The table connector tails that change log gap-free; its cursor commits in the same
   transaction as the runs it starts, so every change triggers exactly once, across
   crashes and restarts.
3. The order workflow of ``pgflow demo`` (``pgflow.demos.orders.build_orders``) handles them.
"""

from __future__ import annotations

import argparse
import asyncio

import psycopg

import pgflow
from pgflow.connectors import table
from pgflow.connectors.capture import Change, changes_stream, make_change_translator
from pgflow.demos.orders import Status, build_orders, format_table


def payment_type(change: Change) -> str:
    """Which payment event a change of a payments row is: from its status column."""
    status = change.row.get("status")
    if status not in ("completed", "failed", "refunded"):
        raise ValueError(f"payment {change.pk}: unknown status {status!r}")  # dead-lettered
    return f"payment.{status}"


async def main(dsn: str) -> None:
    await pgflow.migrate(dsn)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("DROP SCHEMA IF EXISTS shop CASCADE")
        await conn.execute("CREATE SCHEMA shop")
        await conn.execute(
            "CREATE TABLE shop.payments (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " order_id text NOT NULL, status text NOT NULL, amount numeric,"
            " currency text NOT NULL DEFAULT 'EUR')"
        )
        # start the example's workflow afresh (earlier runs of this script)
        await conn.execute("DELETE FROM pgflow.records WHERE workflow = 'shop_orders'")
    await pgflow.capture(dsn, "shop.payments")
    payments = table.Connector(
        changes_stream("shop.payments", name="shop-payments"),
        table.CursorStore(dsn),
        make_change_translator(type=payment_type, foreign_id=lambda c: str(c.row["order_id"])),
    )
    async with build_orders(dsn, payments, name="shop_orders") as wf:
        # The app writes its table as usual; nothing else to call.
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO shop.payments (order_id, status, amount) VALUES"
                " ('A-1', 'completed', 30), ('A-2', 'failed', 12)"
            )
        first = await _wait_run(wf, "A-1", Status.FULFILLED)
        await _wait_run(wf, "A-2", Status.CUSTOMER_NOTIFIED)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(
                "UPDATE shop.payments SET status = 'refunded' WHERE order_id = 'A-1'"
            )
        await _wait_run(wf, "A-1", Status.REFUND_RECORDED, not_run=first)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT foreign_id, status, run_state FROM pgflow.runs"
            " WHERE workflow = 'shop_orders' ORDER BY foreign_id, created_at"
        )
        print(format_table(["order", "status", "run state"], await cur.fetchall()))


async def _wait_run(wf: pgflow.Workflow, foreign_id: str, status: Status, not_run: str = "") -> str:
    for _ in range(500):
        try:
            rec = await wf.latest(foreign_id)
        except pgflow.NotFound:
            rec = None
        if rec is not None and rec.run_id != not_run:
            await wf.wait_for(foreign_id, rec.run_id, status, timeout=30)
            return str(rec.run_id)
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no run for {foreign_id}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default=None)
    args = parser.parse_args()
    if args.dsn is None:
        from pgflow.postgres import embedded_dsn

        args.dsn = embedded_dsn()
    asyncio.run(main(args.dsn))
