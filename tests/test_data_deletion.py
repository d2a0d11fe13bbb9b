"""Data deletion like luno: a custom scrub, finished runs only, repeatable."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow import RunState
from pgflow.testing import require, require_state
from tests._util import wait_until


class S(enum.IntEnum):
    SIGNED_UP = 1
    WAITING = 2
    DONE = 3


@dataclass
class Customer:
    email: str = ""
    name: str = ""
    country: str = ""
    orders: list[int] = field(default_factory=list)


def scrub(c: Customer) -> Customer:
    """Keep what is not personal (country, order ids); erase the rest."""
    return replace(c, email="", name="")


def customer_workflow(dsn: str, **builder: Any) -> pgflow.Workflow[Customer, S]:
    b = pgflow.Builder("customers", Customer, S, polling_frequency=0.05, **builder)
    b.add_step(S.SIGNED_UP, lambda run: S.WAITING, S.WAITING)
    b.add_callback(S.WAITING, lambda run, payload: S.DONE, S.DONE)
    return b.build(dsn)


async def test_custom_delete_keeps_what_is_not_personal(pgflow_dsn: str) -> None:
    async with customer_workflow(pgflow_dsn, custom_delete=scrub) as wf:
        jane = Customer("jane@example.com", "Jane", "NL", [7, 9])
        run_id = await wf.trigger("c1", initial=jane)
        await require(wf, "c1", S.WAITING)
        await wf.callback("c1", S.WAITING)
        rec = await wf.delete_data("c1", run_id, reason="erasure request")
        assert rec.run_state is RunState.DATA_DELETED
        assert rec.object == Customer("", "", "NL", [7, 9])
        with psycopg.connect(pgflow_dsn) as conn:
            row = conn.execute(
                "SELECT object FROM pgflow.records WHERE run_id = %s", (run_id,)
            ).fetchone()
        assert row == ({"email": "", "name": "", "country": "NL", "orders": [7, 9]},)


async def test_in_place_scrub_and_default_erases_everything(pgflow_dsn: str) -> None:
    def in_place(c: Customer) -> None:
        c.email = "***"

    async with customer_workflow(pgflow_dsn, custom_delete=in_place) as wf:
        await wf.trigger("c2", initial=Customer("a@b.c", "A", "DE"))
        await require(wf, "c2", S.WAITING)
        await wf.cancel("c2")
        rec = await wf.delete_data("c2")
        assert rec.object == Customer("***", "A", "DE")
    async with customer_workflow(pgflow_dsn) as wf:
        await wf.trigger("c3", initial=Customer("x@y.z"))
        await require(wf, "c3", S.WAITING)
        await wf.cancel("c3")
        assert (await wf.delete_data("c3")).object is None


async def test_delete_data_only_for_finished_runs_and_repeatable(pgflow_dsn: str) -> None:
    calls: list[str] = []

    def counting(c: Customer) -> Customer:
        calls.append(c.email)
        return replace(c, email="")

    async with customer_workflow(pgflow_dsn, custom_delete=counting) as wf:
        await wf.trigger("c4", initial=Customer("p@q.r"))
        await require(wf, "c4", S.WAITING)
        with pytest.raises(pgflow.InvalidTransition, match=r"cannot delete_data .* RUNNING"):
            await wf.delete_data("c4")
        await wf.pause("c4")
        with pytest.raises(pgflow.InvalidTransition, match="PAUSED"):
            await wf.delete_data("c4")
        assert (await wf.latest("c4")).object.email == "p@q.r"  # nothing changed
        await wf.resume("c4")
        await wf.callback("c4", S.WAITING)
        first = await wf.delete_data("c4")
        again = await wf.delete_data("c4", reason="scrubber learned a new field")
        assert (first.run_state, again.run_state) == (RunState.DATA_DELETED,) * 2
        assert again.version == first.version + 2
        assert calls == ["p@q.r", ""]


async def test_failing_scrub_changes_nothing_then_the_poller_finishes(pgflow_dsn: str) -> None:
    fail = [True]

    def flaky(c: Customer) -> Customer:
        if fail[0]:
            raise RuntimeError("scrubber down")
        return replace(c, email="")

    async with customer_workflow(pgflow_dsn, custom_delete=flaky) as wf:
        await wf.trigger("c5", initial=Customer("s@t.u", country="FR"))
        await require(wf, "c5", S.WAITING)
        await wf.callback("c5", S.WAITING)
        with pytest.raises(RuntimeError, match="scrubber down"):
            await wf.delete_data("c5")
        rec = await wf.latest("c5")
        assert rec.run_state is RunState.REQUESTED_DATA_DELETED
        assert rec.object.email == "s@t.u"  # never half-erased
        fail[0] = False
        rec = await require_state(wf, "c5", RunState.DATA_DELETED)
        assert rec.object == Customer("", "", "FR")


async def test_cli_request_is_finished_by_a_worker_with_the_scrub(pgflow_dsn: str) -> None:
    from pgflow.workflow import actions

    async with customer_workflow(pgflow_dsn, custom_delete=scrub) as wf:
        await wf.trigger("c6", initial=Customer("m@n.o", "M", "BE"))
        await require(wf, "c6", S.WAITING)
        await wf.callback("c6", S.WAITING)
        async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
            # what `pgflow delete-data` does: request only; a worker erases
            await actions.request_data_deletion(conn, "customers", "c6", reason="cli")

        async def erased() -> bool:
            return (await wf.latest("c6")).run_state is RunState.DATA_DELETED

        await wait_until(erased, message="the poller erases with custom_delete")
        rec = await wf.latest("c6")
        assert rec.object == Customer("", "", "BE")
        assert rec.run_state_reason == "cli"


def test_custom_delete_must_be_callable() -> None:
    b = pgflow.Builder("bad", Customer, S, custom_delete="nope")  # type: ignore[arg-type]
    b.add_step(S.SIGNED_UP, lambda run: S.DONE, S.DONE)
    with pytest.raises(pgflow.BuildError, match="custom_delete: 'nope' is not callable"):
        b.build("postgresql://x@127.0.0.1/x")
