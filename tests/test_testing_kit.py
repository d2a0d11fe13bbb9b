"""pgflow.testing: luno's testing helpers, typed, importable without pytest."""

from __future__ import annotations

import enum
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

import pgflow
from pgflow import RunState
from pgflow.testing import (
    Clock,
    await_timeout_insert,
    require,
    testing_run,
    trigger_callback_on,
    wait_for,
)


class S(enum.IntEnum):
    CREATED = 1
    PAID = 2
    SHIPPED = 3
    DELIVERED = 4
    LOST = 5


@dataclass
class Order:
    amount: int = 0
    paid: bool = False
    signed_by: str = ""


async def charge(run: pgflow.Run[Order, S]) -> S | None:
    if run.object.amount <= 0:
        return await run.cancel("nothing to charge")  # type: ignore[func-returns-value]
    if run.object.amount > 1000:
        return await run.pause("needs a human")  # type: ignore[func-returns-value]
    run.object.paid = True
    return S.PAID


def order_workflow(dsn: str, clock: Clock | None = None) -> pgflow.Workflow[Order, S]:
    b = pgflow.Builder("kit", Order, S, polling_frequency=0.05)
    b.add_step(S.CREATED, charge, S.PAID)
    b.add_step(S.PAID, lambda run: S.SHIPPED, S.SHIPPED)

    def sign(run: pgflow.Run[Order, S], payload: dict[str, str]) -> S:
        run.object.signed_by = payload["by"]
        return S.DELIVERED

    b.add_callback(S.SHIPPED, sign, S.DELIVERED)
    b.add_timeout(S.SHIPPED, pgflow.timers.after(timedelta(days=3)), lambda r, n: S.LOST, S.LOST)
    return b.build(dsn, clock=clock)


async def test_testing_run_unit_tests_a_step_without_a_database() -> None:
    run = testing_run(S.CREATED, Order(amount=10))
    assert await charge(run) is S.PAID
    assert run.object == Order(amount=10, paid=True)
    big = testing_run(S.CREATED, Order(amount=5000), foreign_id="o-9")
    assert await charge(big) is None
    assert big.state_changes == [(RunState.PAUSED, "needs a human")]
    zero = testing_run(S.CREATED, Order())
    await charge(zero)
    assert zero.state_changes == [(RunState.CANCELLED, "nothing to charge")]
    assert (run.status, big.foreign_id, run.run_state) == (S.CREATED, "o-9", RunState.RUNNING)
    with pytest.raises(RuntimeError, match="no database"):
        _ = run.tx
    await run.save_and_repeat()
    assert run.repeats == 1


async def test_require_compares_the_object(pgflow_dsn: str) -> None:
    async with order_workflow(pgflow_dsn) as wf:
        await wf.trigger("o1", initial=Order(amount=5))
        rec = await require(wf, "o1", S.SHIPPED, Order(amount=5, paid=True))
        assert rec.status is S.SHIPPED
        with pytest.raises(AssertionError, match=r"object is\n  Order\(amount=5, paid=True"):
            await require(wf, "o1", S.SHIPPED, Order(amount=6, paid=True), timeout=2)


async def test_wait_for_predicate_and_trigger_callback_on(pgflow_dsn: str) -> None:
    async with order_workflow(pgflow_dsn) as wf:
        await wf.trigger("o2", initial=Order(amount=7))
        rec = await trigger_callback_on(wf, "o2", S.SHIPPED, {"by": "ann"})
        assert rec is not None and rec.status is S.DELIVERED
        done = await wait_for(wf, "o2", lambda r: r.run_state is RunState.COMPLETED)
        assert done.object.signed_by == "ann"

        async def paused(r: pgflow.Record[Order, S]) -> bool:
            return r.run_state is RunState.PAUSED

        await wf.trigger("o3", initial=Order(amount=5000))
        rec = await wait_for(wf, "o3", paused)
        assert rec.run_state_reason == "needs a human"
        with pytest.raises(TimeoutError, match=r"predicate not true within 0\.2s"):
            await wait_for(wf, "o3", lambda r: r.status is S.PAID, timeout=0.2)


async def test_a_three_day_timeout_in_milliseconds(pgflow_dsn: str) -> None:
    clock = Clock()
    async with order_workflow(pgflow_dsn, clock) as wf:
        start = clock.now()
        await wf.trigger("o4", initial=Order(amount=1))
        assert await await_timeout_insert(wf, "o4", S.SHIPPED) == [start + timedelta(days=3)]
        clock.advance(timedelta(days=3))
        await require(wf, "o4", S.LOST, Order(amount=1, paid=True), timeout=5)


def test_importing_the_kit_needs_no_pytest() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None; sys.modules['_pytest'] = None\n"
        "import pgflow.testing as t\n"
        "assert not hasattr(t, 'pgflow_dsn')\n"
        "assert t.testing_run and t.Clock and t.require\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_clock_is_a_pgflow_clock() -> None:
    from pgflow.workflow.clock import Clock as Base

    clock = Clock(datetime(2030, 1, 1))
    assert isinstance(clock, Base) and clock.sql_now() == clock.now()
    hits: list[int] = []
    clock.on_change(lambda: hits.append(1))
    clock.advance(1)
    assert hits == [1]
