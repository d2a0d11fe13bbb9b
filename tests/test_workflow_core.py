"""The workflow engine end to end on a real PostgreSQL: runs, API calls, run states."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow import RunState
from pgflow.log.snapshots import CONSUMED
from pgflow.testing import require, require_state
from tests._util import wait_until


class Status(enum.IntEnum):
    CREATED = 1
    PAID = 2
    SHIPPED = 3
    DELIVERED = 4
    REJECTED = 5


@dataclass
class Item:
    sku: str
    qty: int


@dataclass
class Order:
    customer: str = "anon"
    amount: int = 0
    items: list[Item] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


def order_workflow(dsn: str, completed: list[str] | None = None) -> pgflow.Workflow[Order, Status]:
    b = pgflow.Builder("orders", Order, Status, polling_frequency=0.2)

    @b.step(Status.CREATED, to=[Status.PAID, Status.REJECTED], parallel_count=2)
    async def charge(run: pgflow.Run[Order, Status]) -> Status | None:
        run.object.log.append("charge")
        return Status.REJECTED if run.object.amount < 0 else Status.PAID

    async def ship(run: pgflow.Run[Order, Status]) -> Status | None:
        run.object.log.append("ship")
        return Status.SHIPPED

    b.add_step(Status.PAID, ship, Status.SHIPPED)

    @b.step(Status.SHIPPED, to=[Status.DELIVERED])
    def deliver(run: pgflow.Run[Order, Status]) -> Status:  # plain def works too
        run.object.log.append("deliver")
        return Status.DELIVERED

    if completed is not None:

        @b.on_complete
        async def done(run: pgflow.Run[Order, Status]) -> None:
            completed.append(run.foreign_id)

    return b.build(dsn)


async def test_three_step_order_reaches_the_end(pgflow_dsn: str) -> None:
    completed: list[str] = []
    wf = order_workflow(pgflow_dsn, completed)
    async with wf:
        ids = {}
        for i in range(6):
            order = Order(customer=f"c{i}", amount=10 * i, items=[Item("sku", i)])
            ids[f"o{i}"] = await wf.trigger(f"o{i}", initial=order)
        rejected = await wf.trigger("bad", initial=Order(amount=-1))
        for fid, run_id in ids.items():
            rec = await wf.wait_for(fid, run_id, Status.DELIVERED, timeout=15)
            assert rec.status is Status.DELIVERED
            assert rec.run_state is RunState.COMPLETED
            assert rec.run_id == run_id
            assert isinstance(rec.object, Order)
            assert rec.object.log == ["charge", "ship", "deliver"]
            assert rec.object.items[0] == Item("sku", int(fid[1:]))
            assert rec.version == 4
        rec = await wf.wait_for("bad", rejected, Status.REJECTED)
        assert rec.run_state is RunState.COMPLETED
        assert rec.object.log == ["charge"]
        await wait_until(lambda: _ready(len(completed) == 7), message="on_complete x7")
        # The audit trail: one event per state change, versions 1..4, in order.
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute(
                "SELECT type, version FROM pgflow.events WHERE stream = 'orders'"
                " AND foreign_id = 'o3' ORDER BY version"
            )
            assert await cur.fetchall() == [
                ("CREATED", 1),
                ("PAID", 2),
                ("SHIPPED", 3),
                ("DELIVERED", 4),
            ]
    assert sorted(completed) == sorted([*ids, "bad"])


async def _ready(value: Any) -> Any:
    return value


async def test_dict_objects_and_str_enum(pgflow_dsn: str) -> None:
    class S(enum.StrEnum):
        NEW = "new"
        DONE = "done"

    b = pgflow.Builder("dicts", dict, S, polling_frequency=0.2)

    @b.step(S.NEW, to=[S.DONE])
    async def go(run: pgflow.Run[dict[str, Any], S]) -> S:
        run.object["seen"] = run.object["n"] * 2
        return S.DONE

    async with b.build(pgflow_dsn) as wf:
        rec = await pgflow.testing.trigger_and_require(wf, "x", S.DONE, initial={"n": 21})
        assert rec.object == {"n": 21, "seen": 42}
        assert rec.status is S.DONE
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute("SELECT status, object FROM pgflow.records")
            assert await cur.fetchone() == ("DONE", {"n": 21, "seen": 42})


async def test_concurrent_triggers_make_exactly_one_run(pgflow_dsn: str) -> None:
    wf = order_workflow(pgflow_dsn)
    try:
        results = await asyncio.gather(
            *(wf.trigger("same", initial=Order(amount=i)) for i in range(12)),
            return_exceptions=True,
        )
        run_ids = [r for r in results if isinstance(r, str)]
        errors = [r for r in results if not isinstance(r, str)]
        assert len(run_ids) == 1
        assert len(errors) == 11
        assert all(isinstance(e, pgflow.WorkflowInProgress) for e in errors)
        assert "same" in str(errors[0])
        rec = await wf.latest("same")
        assert rec.run_id == run_ids[0]
        assert rec.run_state is RunState.INITIATED
        # Once the run is finished, the foreign id can run again.
        await wf.cancel("same")
        again = await wf.trigger("same")
        assert again != run_ids[0]
    finally:
        await wf.close()


async def test_latest_exists_not_found(pgflow_dsn: str) -> None:
    wf = order_workflow(pgflow_dsn)
    try:
        assert not await wf.exists("nope")
        with pytest.raises(pgflow.NotFound, match="nope"):
            await wf.latest("nope")
        run_id = await wf.trigger("yes", initial=Order(amount=5))
        assert await wf.exists("yes")
        rec = await wf.latest("yes")
        assert (rec.run_id, rec.status, rec.workflow_name) == (run_id, Status.CREATED, "orders")
        assert rec.object == Order(amount=5)
        assert rec.created_at <= rec.updated_at
    finally:
        await wf.close()


async def test_update_status_validated_against_the_graph(pgflow_dsn: str) -> None:
    # No worker running: the run waits at CREATED while we move it by hand.
    wf = order_workflow(pgflow_dsn)
    try:
        await wf.trigger("o1", initial=Order(amount=1))
        before = await wf.latest("o1")
        with pytest.raises(pgflow.InvalidTransition, match="CREATED -> DELIVERED"):
            await wf.update_status("o1", Status.DELIVERED)
        after = await wf.latest("o1")
        assert after == before  # nothing changed
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute("SELECT count(*) FROM pgflow.events")
            assert await cur.fetchone() == (1,)
        rec = await wf.update_status("o1", Status.PAID)
        assert rec.status is Status.PAID and rec.run_state is RunState.RUNNING
        assert rec.version == 2
        rec = await wf.update_status("o1", Status.SHIPPED)
        rec = await wf.update_status("o1", Status.DELIVERED)
        assert rec.run_state is RunState.COMPLETED
        with pytest.raises(pgflow.InvalidTransition, match="COMPLETED"):
            await wf.update_status("o1", Status.PAID)
    finally:
        await wf.close()


async def test_pause_resume_cancel(pgflow_dsn: str) -> None:
    paused: list[str] = []
    cancelled: list[str] = []
    b = pgflow.Builder("pr", Order, Status, polling_frequency=0.2)
    gate = asyncio.Event()

    @b.step(Status.CREATED, to=[Status.PAID])
    async def charge(run: pgflow.Run[Order, Status]) -> Status | None:
        return Status.PAID if gate.is_set() else None

    b.add_step(Status.PAID, lambda run: Status.SHIPPED, Status.SHIPPED)
    b.on_pause(lambda run: paused.append(run.foreign_id))
    b.on_cancel(lambda run: cancelled.append(run.foreign_id))
    async with b.build(pgflow_dsn) as wf:
        run_id = await wf.trigger("a")
        rec = await wf.pause("a", run_id)
        assert rec.run_state is RunState.PAUSED
        # hooks run after commit, from the event log
        await wait_until(lambda: _ready(paused == ["a"]), message="on_pause")
        with pytest.raises(pgflow.InvalidTransition, match="PAUSED"):
            await wf.pause("a", run_id)
        with pytest.raises(pgflow.WorkflowInProgress):
            await wf.trigger("a")  # a paused run is still in progress
        gate.set()
        rec = await wf.resume("a", run_id)
        assert rec.run_state is RunState.RUNNING
        rec = await wf.wait_for("a", run_id, Status.SHIPPED)
        assert rec.run_state is RunState.COMPLETED
        with pytest.raises(pgflow.InvalidTransition, match="COMPLETED"):
            await wf.cancel("a", run_id)

        gate.clear()
        run_b = await wf.trigger("b")
        rec = await wf.cancel("b")
        assert rec.run_state is RunState.CANCELLED
        await wait_until(lambda: _ready(cancelled == ["b"]), message="on_cancel")
        with pytest.raises(pgflow.InvalidTransition):
            await wf.resume("b", run_b)
        with pytest.raises(pgflow.InvalidTransition, match="without reaching"):
            await wf.wait_for("b", run_b, Status.PAID, timeout=5)
        with pytest.raises(pgflow.NotFound):
            await wf.pause("zzz")


async def test_wait_for_timeout(pgflow_dsn: str) -> None:
    wf = order_workflow(pgflow_dsn)
    try:
        run_id = await wf.trigger("slow")
        with pytest.raises(TimeoutError, match="did not reach PAID"):
            await wf.wait_for("slow", run_id, Status.PAID, timeout=0.3)
    finally:
        await wf.close()


async def test_run_pause_and_cancel_inside_a_step(pgflow_dsn: str) -> None:
    b = pgflow.Builder("inside", dict, Status, polling_frequency=0.2)

    @b.step(Status.CREATED, to=[Status.PAID])
    async def decide(run: pgflow.Run[dict[str, Any], Status]) -> Status | None:
        run.object["looked"] = True
        if run.object["what"] == "pause":
            return await run.pause()
        if run.object["what"] == "cancel":
            return await run.cancel()
        return await run.skip()

    async with b.build(pgflow_dsn) as wf:
        await wf.trigger("p", initial={"what": "pause"})
        await wf.trigger("c", initial={"what": "cancel"})
        await wf.trigger("s", initial={"what": "skip"})
        rec = await require_state(wf, "p", RunState.PAUSED)
        assert rec.object["looked"] is True
        await require_state(wf, "c", RunState.CANCELLED)
        rec = await require(wf, "s", Status.CREATED)
        await wait_until(lambda: _consumed(pgflow_dsn, "inside/CREATED", 3), message="consumed")
        rec = await wf.latest("s")
        assert rec.run_state is RunState.INITIATED and rec.version == 1


async def _consumed(dsn: str, consumer: str, n: int) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgflow.events e JOIN pgflow.cursors c"
            f" ON c.consumer = %s AND {CONSUMED}"
            " AND e.stream = c.stream AND e.type = ANY(c.types)",
            (consumer,),
        )
        row = await cur.fetchone()
        return bool(row and row[0] >= n)


async def test_callback(pgflow_dsn: str) -> None:
    b = pgflow.Builder("cb", dict, Status, polling_frequency=0.2)
    b.add_step(Status.CREATED, lambda run: Status.SHIPPED, Status.SHIPPED)

    async def delivery(run: pgflow.Run[dict[str, Any], Status], payload: Any) -> Status | None:
        run.object["signed_by"] = payload["signed_by"]
        return Status.DELIVERED if payload["ok"] else None

    b.add_callback(Status.SHIPPED, delivery, Status.DELIVERED)
    async with b.build(pgflow_dsn) as wf:
        run_id = await wf.trigger("x")
        await wf.wait_for("x", run_id, Status.SHIPPED)
        assert await wf.callback("x", Status.SHIPPED, {"ok": False, "signed_by": "-"}) is None
        assert (await wf.latest("x")).status is Status.SHIPPED
        rec = await wf.callback("x", Status.SHIPPED, {"ok": True, "signed_by": "bob"})
        assert rec is not None and rec.status is Status.DELIVERED
        assert rec.object["signed_by"] == "bob"
        assert rec.run_state is RunState.COMPLETED
        # A late duplicate callback leaves the finished run alone.
        assert await wf.callback("x", Status.SHIPPED, {"ok": True, "signed_by": "eve"}) is None
        with pytest.raises(pgflow.InvalidTransition, match="no callback"):
            await wf.callback("x", Status.PAID, {})


async def test_delete_data_keeps_the_audit_trail(pgflow_dsn: str) -> None:
    wf = order_workflow(pgflow_dsn)
    async with wf:
        run_id = await wf.trigger("pii", initial=Order(customer="Jane Doe", amount=3))
        await wf.wait_for("pii", run_id, Status.DELIVERED)
        rec = await wf.delete_data("pii", run_id)
        assert rec.run_state is RunState.DATA_DELETED
        assert rec.object is None
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute(
                "SELECT object::text FROM pgflow.records WHERE run_id = %s", (run_id,)
            )
            assert await cur.fetchone() == (None,)
            cur = await conn.execute(
                "SELECT headers->>'run_state' FROM pgflow.events WHERE run_id = %s"
                " ORDER BY version",
                (run_id,),
            )
            states = [r[0] for r in await cur.fetchall()]
        assert states[-2:] == ["REQUESTED_DATA_DELETED", "DATA_DELETED"]
        assert len(states) == 6
        # luno: deletion can be repeated (DATA_DELETED -> REQUESTED_DATA_DELETED -> ...)
        rec = await wf.delete_data("pii", run_id)
        assert rec.run_state is RunState.DATA_DELETED and rec.version == 8


async def test_run_tx_writes_commit_with_the_transition_and_roll_back_with_it(
    pgflow_dsn: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE app_effects (foreign_id text, step text)")
    b = pgflow.Builder("fx", dict, Status, polling_frequency=0.1, err_backoff=0.05)

    @b.step(Status.CREATED, to=[Status.PAID])
    async def charge(run: pgflow.Run[dict[str, Any], Status]) -> Status:
        await run.tx.execute("INSERT INTO app_effects VALUES (%s, 'charge')", (run.foreign_id,))
        if run.object.get("fail_after_write"):
            raise RuntimeError("boom after writing")
        return Status.PAID

    @b.step(Status.PAID, to=[Status.SHIPPED])
    async def bad_move(run: pgflow.Run[dict[str, Any], Status]) -> Status:
        await run.tx.execute("INSERT INTO app_effects VALUES (%s, 'ship')", (run.foreign_id,))
        return Status.DELIVERED  # not a declared destination: the transition fails

    async with b.build(pgflow_dsn) as wf:
        await wf.trigger("ok")
        await wf.trigger("fail", initial={"fail_after_write": True})
        await require_state(wf, "fail", RunState.PAUSED, timeout=15)
        rec = await require_state(wf, "ok", RunState.PAUSED, timeout=15)
        assert rec.status is Status.PAID
        assert "DELIVERED" in (rec.last_error or "")
        assert rec.err_count == 5
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        cur = await conn.execute("SELECT foreign_id, step FROM app_effects ORDER BY 1, 2")
        assert await cur.fetchall() == [("ok", "charge")]


async def test_pydantic_objects(pgflow_dsn: str) -> None:
    import pydantic

    class Payment(pydantic.BaseModel):
        amount: int
        items: list[Item] = []
        captured: bool = False

    b = pgflow.Builder("pyd", Payment, Status, polling_frequency=0.2)

    @b.step(Status.CREATED, to=[Status.PAID])
    async def capture(run: pgflow.Run[Payment, Status]) -> Status:
        assert isinstance(run.object, Payment)
        run.object = run.object.model_copy(update={"captured": True})
        return Status.PAID

    async with b.build(pgflow_dsn) as wf:
        initial = Payment(amount=7, items=[Item("a", 1)])
        rec = await pgflow.testing.trigger_and_require(wf, "p1", Status.PAID, initial=initial)
        assert rec.object == Payment(amount=7, items=[Item("a", 1)], captured=True)


async def test_build_on_a_shared_non_autocommit_pool(pool: Any) -> None:
    # The app's own pool (psycopg default: not autocommit) works for everything.
    wf = order_workflow_on(pool)
    async with wf:
        run_id = await wf.trigger("shared", initial=Order(amount=1))
        rec = await wf.wait_for("shared", run_id, Status.DELIVERED)
        assert rec.run_state is RunState.COMPLETED
        await wf.delete_data("shared", run_id)
        assert (await wf.latest("shared")).run_state is RunState.DATA_DELETED
    assert not pool.closed  # a shared pool is not closed by the workflow


def order_workflow_on(pool: Any) -> pgflow.Workflow[Order, Status]:
    b = pgflow.Builder("orders", Order, Status, polling_frequency=0.2)
    b.add_step(Status.CREATED, lambda run: Status.PAID, Status.PAID)
    b.add_step(Status.PAID, lambda run: Status.SHIPPED, Status.SHIPPED)
    b.add_step(Status.SHIPPED, lambda run: Status.DELIVERED, Status.DELIVERED)
    return b.build(pool)
