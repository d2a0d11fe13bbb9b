"""The README's workflow: an order is charged, then shipped.

    python examples/orders.py [--dsn DSN]   # default: $PGFLOW_DATABASE_URL, else embedded

The charge step writes to an app table through ``run.tx``: that row commits in the same
transaction as the CREATED → PAID transition, so a crash can never leave a charge
without its transition, or the reverse.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import os
from dataclasses import dataclass

import psycopg

import pgflow
from pgflow.postgres import embedded_dsn


class Status(enum.IntEnum):
    CREATED = 1
    PAID = 2
    SHIPPED = 3


@dataclass
class Order:
    amount: int


b = pgflow.Builder("orders-example", Order, Status)


@b.step(Status.CREATED, to=[Status.PAID])
async def charge(run: pgflow.Run[Order, Status]) -> Status | None:
    # app writes through run.tx commit atomically with the transition
    await run.tx.execute(
        "INSERT INTO app.charges (order_id, amount) VALUES (%s, %s)",
        (run.foreign_id, run.object.amount),
    )
    return Status.PAID


@b.step(Status.PAID, to=[Status.SHIPPED])
async def ship(run: pgflow.Run[Order, Status]) -> Status | None:
    return Status.SHIPPED


async def main(dsn: str) -> None:
    await pgflow.migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS app")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS app.charges (order_id text PRIMARY KEY, amount int)"
        )
    async with b.build(dsn) as wf:
        foreign_id = f"order-{os.getpid()}"
        run_id = await wf.trigger(foreign_id, initial=Order(amount=42))
        record = await wf.wait_for(foreign_id, run_id, Status.SHIPPED, timeout=10)
        print(f"{foreign_id}: {record.status.name} ({record.run_state.name})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PGFLOW_DATABASE_URL"))
    args = parser.parse_args()
    asyncio.run(main(args.dsn or embedded_dsn()))
