"""Change capture: inserts, updates and deletes of an app table become events."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import pgflow
from pgflow.connectors import table
from pgflow.connectors.capture import (
    Change,
    change_translator,
    changes_stream,
    make_change_translator,
)
from tests._util import take_batch


async def test_capture_inserts_updates_deletes(pgflow_dsn: str, pool: Any) -> None:
    async with pool.connection() as conn:
        await conn.execute("CREATE SCHEMA app")
        await conn.execute(
            "CREATE TABLE app.orders (id text PRIMARY KEY, status text, total numeric)"
        )
    await pgflow.capture(pgflow_dsn, "app.orders")
    await pgflow.capture(pgflow_dsn, "app.orders")  # idempotent
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO app.orders VALUES ('o1', 'new', 10), ('o2', 'new', 5)")
        await conn.execute("UPDATE app.orders SET status = 'paid' WHERE id = 'o1'")
        await conn.execute("UPDATE app.orders SET status = status")  # no-op: not recorded
        await conn.execute("DELETE FROM app.orders WHERE id = 'o2'")
    connector = table.Connector(
        changes_stream("app.orders"), table.CursorStore(pool), change_translator
    )
    consumer = await connector.make("orders-cdc")
    events = await take_batch(consumer, pool, 4)
    assert [(e.type, e.foreign_id) for e in events] == [
        ("insert", "o1"),
        ("insert", "o2"),
        ("update", "o1"),
        ("delete", "o2"),
    ]
    update, delete = events[2], events[3]
    assert update.headers["status"] == "paid" and update.headers["pgflow.changed"] == "status"
    assert (
        update.headers["pgflow.table"] == "app.orders" and update.headers["pgflow.op"] == "UPDATE"
    )
    assert delete.headers["total"] == "5"  # the row as it was
    assert await take_batch(consumer, pool) == []

    await pgflow.uncapture(pgflow_dsn, "app.orders")
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO app.orders VALUES ('o3', 'new', 1)")
    assert await take_batch(consumer, pool) == []


async def test_capture_in_callers_transaction_and_composite_keys(
    pgflow_dsn: str, pool: Any
) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "CREATE TABLE lines (order_id text, line int, sku text, PRIMARY KEY (order_id, line))"
        )
        await pgflow.capture(conn, "lines")  # same transaction as the app's DDL
        await conn.execute("INSERT INTO lines VALUES ('o1', 1, 'abc')")
    translate = make_change_translator(
        type=lambda c: f"line.{c.op.lower()}", foreign_id=lambda c: str(c.row["order_id"])
    )
    consumer = await table.Connector(
        changes_stream(["public.lines"], ops=["INSERT"]), table.CursorStore(pool), translate
    ).make("l")
    [ev] = await take_batch(consumer, pool, 1)
    assert (ev.type, ev.foreign_id, ev.headers["sku"]) == ("line.insert", "o1", "abc")
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT pk FROM pgflow.changes")
        assert await cur.fetchone() == ('["o1", 1]',)


async def test_capture_errors_are_clear(pgflow_dsn: str, pool: Any) -> None:
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE nokey (a int)")
    with pytest.raises(psycopg.Error, match="no primary key"):
        await pgflow.capture(pgflow_dsn, "nokey")
    with pytest.raises(psycopg.Error, match="no column"):
        await pgflow.capture(pgflow_dsn, "nokey", key=["b"])
    await pgflow.capture(pgflow_dsn, "nokey", key="a")
    with pytest.raises(ValueError, match="ops"):
        changes_stream("nokey", ops=["TRUNCATE"])


async def test_capture_rolled_back_writes_are_not_recorded(pgflow_dsn: str, pool: Any) -> None:
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    await pgflow.capture(pgflow_dsn, "t")
    async with pool.connection() as conn:
        async with conn.transaction(force_rollback=True):
            await conn.execute("INSERT INTO t VALUES (1)")
        await conn.execute("INSERT INTO t VALUES (2)")
        cur = await conn.execute("SELECT table_name, op, pk, new FROM pgflow.changes")
        rows = await cur.fetchall()
    assert rows == [("public.t", "INSERT", "2", {"id": 2})]
    change = Change.from_row(
        {
            "id": 1,
            "table_name": "public.t",
            "op": "INSERT",
            "pk": "2",
            "old": None,
            "new": {"id": 2},
        }
    )
    assert change.row == {"id": 2} and change.changed == ["id"]


@pytest.mark.parametrize("custom", [False, True], ids=["pk-translator", "custom-translator"])
async def test_delete_data_erases_the_runs_change_rows(
    pgflow_dsn: str, pool: Any, custom: bool
) -> None:
    """Erasure reaches pgflow's own copy of the data: the change log rows a capture
    connector delivered for the run's foreign id lose their row images; other foreign
    ids' rows, and the user's table, are untouched."""
    import enum

    from pgflow.testing import require_state

    class S(enum.IntEnum):
        NEW = 1
        DONE = 2

    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE customers (id text PRIMARY KEY, email text)")
    await pgflow.capture(pgflow_dsn, "customers")
    translator = (
        make_change_translator(foreign_id=lambda c: "cust-" + str(c.row["id"]))
        if custom
        else change_translator
    )
    prefix = "cust-" if custom else ""

    async def on_change(api: Any, event: Any) -> None:
        if event.type == "insert":
            await api.trigger(event.foreign_id)

    b = pgflow.Builder("erase-cdc", dict, S, polling_frequency=0.1)
    b.add_step(S.NEW, lambda run: S.DONE, S.DONE)
    b.add_connector(
        "cdc",
        table.Connector(changes_stream("customers"), table.CursorStore(pool), translator),
        on_change,
    )
    async with b.build(pgflow_dsn) as wf:
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO customers VALUES ('a', 'a@example.com'), ('b', 'b@example.com')"
            )
            await conn.execute("UPDATE customers SET email = 'a2@example.com' WHERE id = 'a'")
        await require_state(wf, prefix + "a", pgflow.RunState.COMPLETED)
        await require_state(wf, prefix + "b", pgflow.RunState.COMPLETED)
        await wf.delete_data(prefix + "a")
        await require_state(wf, prefix + "a", pgflow.RunState.DATA_DELETED)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT pk, old IS NULL AND new IS NULL FROM pgflow.changes ORDER BY id"
        )
        assert await cur.fetchall() == [("a", True), ("b", False), ("a", True)]
        cur = await conn.execute("SELECT count(*) FROM customers")
        assert await cur.fetchone() == (2,)


async def test_a_partitioned_table_is_captured_under_its_own_name(
    pgflow_dsn: str, pool: Any
) -> None:
    """0.1 recorded a partition's changes under the partition's name, so
    changes_stream(parent) got nothing."""
    async with pool.connection() as conn:
        await conn.execute(
            "CREATE TABLE measures (id int, day date, v int, PRIMARY KEY (id, day))"
            " PARTITION BY RANGE (day)"
        )
        await conn.execute(
            "CREATE TABLE measures_a PARTITION OF measures"
            " FOR VALUES FROM ('2026-01-01') TO ('2026-07-01')"
        )
        await conn.execute(
            "CREATE TABLE measures_b PARTITION OF measures"
            " FOR VALUES FROM ('2026-07-01') TO ('2027-01-01')"
        )
    await pgflow.capture(pgflow_dsn, "measures")
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO measures VALUES (1, '2026-02-01', 1), (2, '2026-08-01', 2)")
    consumer = await table.Connector(
        changes_stream("measures"), table.CursorStore(pool), change_translator
    ).make("parts")
    events = await take_batch(consumer, pool, 2)
    assert [e.headers["pgflow.table"] for e in events] == ["public.measures"] * 2
    assert [e.headers["v"] for e in events] == ["1", "2"]


async def test_a_renamed_table_is_followed_or_fails_loudly(pgflow_dsn: str, pool: Any) -> None:
    """0.1's readers went silent after a rename (they filtered on the old name)."""
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE accounts (id text PRIMARY KEY)")
    await pgflow.capture(pgflow_dsn, "accounts")
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO accounts VALUES ('before')")
        await conn.execute("ALTER TABLE accounts RENAME TO ledger_accounts")
        await conn.execute("INSERT INTO ledger_accounts VALUES ('after')")
    old_name = await table.Connector(
        changes_stream("accounts"), table.CursorStore(pool), change_translator
    ).make("old")
    with pytest.raises(psycopg.errors.UndefinedTable, match="accounts"):
        async with pool.connection() as conn, conn.transaction():
            await old_name.recv_batch_in(conn, 10)
    new_name = await table.Connector(
        changes_stream("ledger_accounts"), table.CursorStore(pool), change_translator
    ).make("new")
    events = await take_batch(new_name, pool, 2)
    assert [e.foreign_id for e in events] == ["before", "after"]
    assert [e.headers["pgflow.table"] for e in events] == [
        "public.accounts",
        "public.ledger_accounts",
    ]
