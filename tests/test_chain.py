"""Workflow chaining: workflow A reaching a status triggers or calls back workflow B,
exactly once (luno: a reflex stream over another workflow's events)."""

from __future__ import annotations

import enum
from collections import Counter
from typing import Any

import psycopg

import pgflow
from pgflow import RunState
from pgflow.connectors import ConnectorEvent
from pgflow.testing import require
from pgflow.workflow.chain import on_run_state, on_status


class Order(enum.IntEnum):
    CREATED = 1
    PAID = 2
    SHIPPED = 3


class Mail(enum.IntEnum):
    QUEUED = 1
    SENT = 2
    WAITING_FOR_SHIPMENT = 3
    DONE = 4


def orders(dsn: str, flaky: Counter[str] | None = None) -> pgflow.Builder[dict[str, Any], Order]:
    b = pgflow.Builder("orders", dict, Order, polling_frequency=0.05)

    def ship(run: pgflow.Run[dict[str, Any], Order]) -> Order:
        if flaky is not None and flaky[run.foreign_id] < 1:
            flaky[run.foreign_id] += 1
            raise RuntimeError("courier down once")  # retried: re-emits a PAID event
        return Order.SHIPPED

    b.add_step(Order.CREATED, lambda run: Order.PAID, Order.PAID)
    b.add_step(Order.PAID, ship, Order.SHIPPED, err_backoff=0.01)
    return b


async def test_status_reached_in_a_triggers_b_exactly_once(pgflow_dsn: str) -> None:
    handled: Counter[str] = Counter()
    b = pgflow.Builder("mails", dict, Mail, polling_frequency=0.05)
    b.add_step(Mail.QUEUED, lambda run: Mail.SENT, Mail.SENT)

    async def on_paid(api: pgflow.API[dict[str, Any], Mail], event: ConnectorEvent) -> None:
        handled[event.foreign_id] += 1
        assert event.type == "PAID" and event.headers["workflow"] == "orders"
        await api.trigger(f"receipt-{event.foreign_id}", initial={"run": event.headers["run_id"]})

    b.add_connector("paid", on_status("orders", Order.PAID, db=pgflow_dsn), on_paid)
    flaky: Counter[str] = Counter()
    async with orders(pgflow_dsn, flaky).build(pgflow_dsn) as a, b.build(pgflow_dsn) as mails:
        for i in range(20):
            await a.trigger(f"o{i}")
        for i in range(20):
            await require(a, f"o{i}", Order.SHIPPED)
            await require(mails, f"receipt-o{i}", Mail.SENT)
        # the retried PAID events (change=retry) and the SHIPPED ones are not moves to PAID
        assert handled == Counter({f"o{i}": 1 for i in range(20)})
    # a restart resumes from the stored cursor: nothing is handled twice
    async with b.build(pgflow_dsn) as mails, orders(pgflow_dsn).build(pgflow_dsn) as a:
        await a.trigger("late")
        await require(mails, "receipt-late", Mail.SENT)
    assert handled["late"] == 1 and sum(handled.values()) == 21
    with psycopg.connect(pgflow_dsn) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT foreign_id) FROM pgflow.records"
            " WHERE workflow = 'mails'"
        ).fetchone()
    assert row == (21, 21)


async def test_completion_of_a_calls_back_b(pgflow_dsn: str) -> None:
    b = pgflow.Builder("mails", dict, Mail, polling_frequency=0.05)
    b.add_callback(Mail.WAITING_FOR_SHIPMENT, lambda run, payload: Mail.DONE, Mail.DONE)

    async def completed(api: pgflow.API[dict[str, Any], Mail], event: ConnectorEvent) -> None:
        await api.callback(event.foreign_id, Mail.WAITING_FOR_SHIPMENT, dict(event.headers))

    b.add_connector(
        "orders-done", on_run_state("orders", RunState.COMPLETED, db=pgflow_dsn), completed
    )
    a = pgflow.Builder("orders", dict, Order, polling_frequency=0.05)
    a.add_callback(Order.CREATED, lambda run, payload: Order.PAID, Order.PAID)
    async with a.build(pgflow_dsn) as orders_wf, b.build(pgflow_dsn) as mails:
        for fid in ("o1", "o2"):
            await mails.trigger(fid, start_at=Mail.WAITING_FOR_SHIPMENT)
            await orders_wf.trigger(fid)
        await orders_wf.cancel("o2", reason="customer changed their mind")  # not completed
        await orders_wf.callback("o1", Order.CREATED)  # completes o1 (PAID is terminal)
        rec = await require(mails, "o1", Mail.DONE)
        assert rec.run_state is RunState.COMPLETED
        # events are handled in log order: o2's cancel came before o1's completion
        assert (await mails.latest("o2")).status is Mail.WAITING_FOR_SHIPMENT
