"""``pgflow demo``: the seed example end to end, exit 0, a table of runs and SQL."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from pgflow import migrate
from pgflow.cli import main
from pgflow.connectors.memory import Connector as MemoryConnector
from pgflow.demos.orders import WORKFLOW, build_orders, sample_events
from tests._util import wait_until


def test_pgflow_demo(pgflow_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dsn", pgflow_dsn]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    runs = [line.split()[:3] for line in lines if line.startswith("order-")]
    assert runs == [
        ["order-1", "FULFILLED", "COMPLETED"],
        ["order-1", "REFUND_RECORDED", "COMPLETED"],
        ["order-2", "FULFILLED", "COMPLETED"],
        ["order-3", "CUSTOMER_NOTIFIED", "COMPLETED"],
    ]
    assert "missing header 'amount'" in out and "not an ISO 4217 code" in out
    assert "SELECT foreign_id, status, run_state, object FROM pgflow.runs" in out
    assert main(["demo", "--dsn", pgflow_dsn]) == 0  # again: same result, fresh run
    again = capsys.readouterr().out
    assert [line.split()[:3] for line in again.splitlines() if line.startswith("order-")] == runs


async def _users_orders(dsn: str) -> None:
    """A user's own `orders` workflow (the name the docs use), with runs on the same
    foreign ids as the demo's and dead letters of a connector named like the demo's."""
    await migrate(dsn)
    memory = MemoryConnector(sample_events("-user"))
    async with build_orders(dsn, memory, name="orders"):
        await wait_until(
            lambda: _scalar(
                dsn,
                "SELECT count(*) = 3 FROM pgflow.records"
                " WHERE workflow = 'orders' AND run_state = 'COMPLETED'",
            ),
            timeout=30,
            message="the user's runs",
        )
        await wait_until(
            lambda: _scalar(
                dsn,
                "SELECT count(*) = 2 FROM pgflow.dead_letters"
                " WHERE consumer = 'orders--payment-processor'",
            ),
            timeout=30,
            message="the user's dead letters",
        )


async def _scalar(dsn: str, sql: str) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute(sql)).fetchone()
        return row[0] if row else None


SNAPSHOT = {
    "records": "SELECT * FROM pgflow.records WHERE workflow = 'orders' ORDER BY run_id",
    "dead letters": "SELECT * FROM pgflow.dead_letters WHERE consumer LIKE 'orders--%' ORDER BY id",
    "events": "SELECT * FROM pgflow.events WHERE stream LIKE 'orders%' ORDER BY id",
    "cursors": "SELECT * FROM pgflow.cursors WHERE consumer LIKE '%orders%' ORDER BY 1",
    "demo runs": f"SELECT run_id, foreign_id, status, run_state FROM pgflow.records"
    f" WHERE workflow = '{WORKFLOW}' ORDER BY run_id",
}


def _snapshot(dsn: str) -> dict[str, list[Any]]:
    with psycopg.connect(dsn) as conn:
        return {name: conn.execute(sql).fetchall() for name, sql in SNAPSHOT.items()}


def test_pgflow_demo_never_touches_a_users_orders_workflow(
    pgflow_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10: `pgflow demo` against PGFLOW_DATABASE_URL deleted every record of a
    workflow named `orders`. It must leave data it did not create alone."""
    asyncio.run(_users_orders(pgflow_dsn))
    assert main(["demo", "--dsn", pgflow_dsn]) == 0  # a first demo run
    before = _snapshot(pgflow_dsn)
    assert len(before["records"]) == 3 and len(before["dead letters"]) == 2
    assert len(before["demo runs"]) == 4
    assert main(["demo", "--dsn", pgflow_dsn]) == 0
    out = capsys.readouterr().out
    after = _snapshot(pgflow_dsn)
    for name in ("records", "dead letters", "events", "cursors"):
        assert after[name] == before[name], name
    # the earlier demo's runs are kept as well; this run reports only its own four
    assert set(before["demo runs"]) < set(after["demo runs"])
    assert len(after["demo runs"]) == 8
    assert len([line for line in out.splitlines() if line.startswith("order-")]) == 4 * 2
