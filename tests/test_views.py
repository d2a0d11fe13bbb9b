"""The human-facing views (sql/views.sql) against known runs.

Runs are written with the engine's own record functions (insert_run / write_change /
admin.pause), so the events carry exactly what the engine stores.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection

from pgflow.log.cursors import CursorKey, advance_cursor, ensure_cursor
from pgflow.log.events import NewEvent, Position, append, shard_hash
from pgflow.log.streamer import Filter, head_position, read_batch
from pgflow.ops.migrations import migrate
from pgflow.workflow import actions
from pgflow.workflow.records import RunState, insert_run, write_change
from tests._util import wait_until

TP = "00-{trace}-{span}-01"


def tp(trace: int, span: int) -> str:
    return TP.format(trace=f"{trace:032x}", span=f"{span:016x}")


async def build_scenario(conn: AsyncConnection[Any]) -> dict[str, uuid.UUID]:
    """Known runs (workflow "orders" unless said otherwise):

    order-1  CREATED -> PAID -> SHIPPED, COMPLETED (traced)
    order-2  CREATED, INITIATED, err_count 2 ("boom")
    order-3  CREATED -> PAID, then paused
    order-4  CREATED, last moved an hour ago (idle)
    order-5  CREATED, last moved an hour ago, timer due in an hour (waiting, not stuck)
    order-6  CREATED, last moved an hour ago, timer overdue by an hour
    refunds / order-1  REQUESTED, INITIATED
    """
    ids: dict[str, uuid.UUID] = {}

    async def new(fid: str, workflow: str = "orders", trace: str | None = None) -> Any:
        rid = uuid.uuid4()
        ids[f"{workflow}/{fid}"] = rid
        return await insert_run(
            conn,
            workflow=workflow,
            foreign_id=fid,
            run_id=rid,
            status="REQUESTED" if workflow == "refunds" else "CREATED",
            object_json='{"amount": 10}',
            traceparent=trace,
        )

    rec = await new("order-1", trace=tp(1, 1))
    rec = await write_change(
        conn, rec, change="step", status="PAID", run_state=RunState.RUNNING, traceparent=tp(1, 2)
    )
    assert rec is not None
    rec = await write_change(
        conn,
        rec,
        change="step",
        status="SHIPPED",
        run_state=RunState.COMPLETED,
        traceparent=tp(1, 3),
    )
    assert rec is not None

    rec = await new("order-2")
    await conn.execute(
        "UPDATE pgflow.records SET err_count = 2, last_error = 'boom' WHERE run_id = %s",
        (rec.run_id,),
    )
    rec = await new("order-3")
    rec = await write_change(conn, rec, change="step", status="PAID", run_state=RunState.RUNNING)
    assert rec is not None
    await actions.pause(conn, "orders", "order-3")
    for fid in ("order-4", "order-5", "order-6"):
        rec = await new(fid)
        await conn.execute(
            "UPDATE pgflow.records SET updated_at = now() - interval '1 hour',"
            " created_at = now() - interval '2 hours' WHERE run_id = %s",
            (rec.run_id,),
        )
    for fid, due in (("order-5", "1 hour"), ("order-6", "-1 hour")):
        await conn.execute(
            "INSERT INTO pgflow.timeouts (workflow, foreign_id, run_id, status, version,"
            " expire_at) VALUES ('orders', %s, %s, 'CREATED', 1, now() + %s::interval)",
            (fid, ids[f"orders/{fid}"], due),
        )
    await new("order-1", workflow="refunds")
    return ids


async def rows(conn: AsyncConnection[Any], sql: str, *params: Any) -> list[dict[str, Any]]:
    cur = await conn.execute(sql, params or None)
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]


async def test_runs_one_row_per_run_latest_state(pool) -> None:
    async with pool.connection() as conn:
        ids = await build_scenario(conn)
        runs = await rows(conn, "SELECT * FROM pgflow.runs ORDER BY workflow, foreign_id")
    assert len(runs) == 7
    by = {(r["workflow"], r["foreign_id"]): r for r in runs}
    done = by[("orders", "order-1")]
    assert done["run_id"] == ids["orders/order-1"]
    assert (done["status"], done["run_state"], done["active"]) == ("SHIPPED", "COMPLETED", False)
    assert done["version"] == 3
    assert done["trace_id"] == f"{1:032x}"
    assert done["object"] == {"amount": 10}
    failing = by[("orders", "order-2")]
    assert (failing["err_count"], failing["last_error"], failing["active"]) == (2, "boom", True)
    assert by[("orders", "order-3")]["run_state"] == "PAUSED"
    idle = by[("orders", "order-4")]["idle_for"]
    assert 3500 < idle.total_seconds() < 3700 and idle.microseconds == 0  # readable: whole s
    assert by[("refunds", "order-1")]["status"] == "REQUESTED"


def docs_query() -> str:
    """The first SQL block of docs/observability.md ("where is order-123?")."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text()
    return text.split("```sql\n", 1)[1].split("```", 1)[0].replace("order-123", "order-1")


async def test_run_history_answers_where_is_it_and_how_did_it_get_there(pool) -> None:
    async with pool.connection() as conn:
        ids = await build_scenario(conn)
        # The query from docs/observability.md, verbatim.
        history = await rows(conn, docs_query())
        full = await rows(
            conn,
            "SELECT * FROM pgflow.run_history WHERE run_id = %s ORDER BY step",
            ids["orders/order-1"],
        )
    orders = [h for h in history if h["workflow"] == "orders"]
    got = [(h["step"], h["from_status"], h["status"], h["change"], h["run_state"]) for h in orders]
    assert got == [
        (1, None, "CREATED", "trigger", "INITIATED"),
        (2, "CREATED", "PAID", "step", "RUNNING"),
        (3, "PAID", "SHIPPED", "step", "COMPLETED"),
    ]
    assert [h["status"] for h in history if h["workflow"] == "refunds"] == ["REQUESTED"]
    assert orders[0]["at"] <= orders[1]["at"] <= orders[2]["at"]
    assert orders[0]["trace_id"] == f"{1:032x}"
    assert [h["version"] for h in full] == [1, 2, 3]
    assert full[0]["after"] is None and full[1]["after"].total_seconds() >= 0
    assert [h["trace_id"] for h in full] == [f"{1:032x}"] * 3
    assert full[2]["traceparent"] == tp(1, 3)
    assert {h["current_status"] for h in full} == {"SHIPPED"}


async def test_run_history_shows_pause_and_resume(pool) -> None:
    async with pool.connection() as conn:
        await build_scenario(conn)
        await actions.resume(conn, "orders", "order-3")
        history = await rows(
            conn,
            "SELECT status, change, run_state FROM pgflow.run_history"
            " WHERE workflow = 'orders' AND foreign_id = 'order-3' ORDER BY step",
        )
    assert [(h["status"], h["change"], h["run_state"]) for h in history] == [
        ("CREATED", "trigger", "INITIATED"),
        ("PAID", "step", "RUNNING"),
        ("PAID", "pause", "PAUSED"),
        ("PAID", "resume", "RUNNING"),
    ]


async def test_run_history_filter_is_pushed_below_the_window(pool) -> None:
    async with pool.connection() as conn:
        await build_scenario(conn)
        cur = await conn.execute(
            "EXPLAIN SELECT * FROM pgflow.run_history WHERE foreign_id = 'order-1'"
        )
        plan = "\n".join(r[0] for r in await cur.fetchall())
    # Filtering above the window aggregate would mean scanning every run's events.
    assert "Subquery Scan" not in plan, plan
    assert "order-1" in plan.split("WindowAgg", 1)[1], plan


async def test_stuck_runs_reasons_and_threshold(pool) -> None:
    async with pool.connection() as conn:
        await build_scenario(conn)
        stuck = await rows(conn, "SELECT foreign_id, reason FROM pgflow.stuck_runs")
        await conn.execute("SET pgflow.stuck_after = '3 hours'")
        patient = await rows(conn, "SELECT foreign_id, reason FROM pgflow.stuck_runs")
        await conn.execute("SET pgflow.stuck_after = '1 minute'")
        eager = await rows(conn, "SELECT foreign_id, reason FROM pgflow.stuck_runs")
        await conn.execute("RESET pgflow.stuck_after")
    assert {r["foreign_id"]: r["reason"] for r in stuck} == {
        "order-2": "erroring",
        "order-3": "paused",
        "order-4": "idle",
        "order-6": "timer overdue",
    }
    # Nothing has been idle for 3 hours; paused and failing runs are always listed.
    assert {r["foreign_id"]: r["reason"] for r in patient} == {
        "order-2": "erroring",
        "order-3": "paused",
    }
    # order-5's timer is not due yet: waiting, not stuck, whatever the threshold.
    assert "order-5" not in {r["foreign_id"] for r in eager}


async def test_consumer_lag_counts_what_is_ahead_per_shard(pool) -> None:
    fids = [f"f{i}" for i in range(12)]
    async with pool.connection() as conn:
        await append(
            conn, [NewEvent("s", "A" if i % 3 else "B", fid) for i, fid in enumerate(fids)]
        )
        await conn.commit()
        await ensure_cursor(conn, CursorKey("all"), Filter("s"))
        await ensure_cursor(conn, CursorKey("only-a"), Filter("s", types=("A",)))
        for shard in range(2):
            await ensure_cursor(
                conn, CursorKey("sharded", shard, 2), Filter("s", shard=shard, shard_count=2)
            )

        async def lag() -> dict[tuple[str, int], dict[str, Any]]:
            got = await rows(conn, "SELECT * FROM pgflow.consumer_lag")
            return {(r["consumer"], r["shard"]): r for r in got}

        before = await lag()
        assert before[("all", 0)]["lag_events"] == 12
        assert before[("only-a", 0)]["lag_events"] == 8
        per_shard = [sum(1 for f in fids if shard_hash(f) % 2 == s) for s in range(2)]
        assert [before[("sharded", s)]["lag_events"] for s in range(2)] == per_shard
        assert before[("all", 0)]["lag_seconds"] >= 0
        assert before[("all", 0)]["oldest_pending_at"] is not None
        assert before[("all", 0)]["horizon_age_seconds"] >= 0
        # Original contract columns, in their original order.
        assert list(before[("all", 0)])[:10] == [
            "consumer", "shard", "shard_count", "stream", "types", "cursor_tx", "cursor_id",
            "updated_at", "lag_events", "lag_seconds",
        ]  # fmt: skip

        head = await head_position(conn)
        assert await advance_cursor(conn, CursorKey("all"), Position(), head)
        after = await lag()
        assert (after[("all", 0)]["lag_events"], after[("all", 0)]["lag_seconds"]) == (0, 0.0)
        assert after[("all", 0)]["oldest_pending_at"] is None


async def test_consumer_lag_counts_from_inside_a_diff(pool) -> None:
    """A cursor part-way through a diff has consumed the rows up to its ``after_id``
    (pgflow.consumed, shared with prune and the repair): the view counts the rest."""
    async with pool.connection() as conn:
        await append(conn, [NewEvent("d", "A", f"f{i}") for i in range(12)])
        await conn.commit()
        key = CursorKey("partway")
        await ensure_cursor(conn, key, Filter("d"))
        batch = await read_batch(conn, Filter("d"), Position(), limit=5)
        assert batch.position is not None and batch.position.in_diff
        assert await advance_cursor(conn, key, Position(), batch.position)
        [row] = await rows(conn, "SELECT * FROM pgflow.consumer_lag WHERE consumer = 'partway'")
        assert row["lag_events"] == 7
        assert row["cursor_id"] == batch.events[-1].id


async def test_horizon_names_the_transaction_holding_it_back(pool, pgflow_dsn) -> None:
    holder = await psycopg.AsyncConnection.connect(pgflow_dsn, application_name="slow-batch")
    try:
        await holder.execute("SELECT pg_current_xact_id()")  # takes an xid, stays open
        holder_pid = holder.info.backend_pid
        async with pool.connection() as conn:

            async def held() -> dict[str, Any] | None:
                # The horizon is cluster-wide: another test's transaction may be older
                # than ours, so the view must report at least our holder's age.
                got = (await rows(conn, "SELECT * FROM pgflow.horizon"))[0]
                mine = await rows(
                    conn,
                    "SELECT extract(epoch FROM clock_timestamp() - xact_start)::float8 AS age"
                    " FROM pg_stat_activity WHERE pid = %s",
                    holder_pid,
                )
                age = mine[0]["age"]
                return got if age > 0.2 and got["age_seconds"] >= age - 0.05 else None

            row = await wait_until(held, timeout=10, message="horizon to cover the holder")
            if row["pid"] == holder_pid:
                assert row["application_name"] == "slow-batch"
                assert row["state"] == "idle in transaction"
            else:
                assert row["xact_start"] is not None  # an older transaction elsewhere
            lag = await rows(conn, "SELECT horizon_age_seconds FROM pgflow.consumer_lag")
            assert lag == []  # no cursors: the horizon is still in pgflow.horizon
    finally:
        await holder.rollback()
        await holder.close()


async def test_dead_letter_queue_and_run_counts(pool) -> None:
    async with pool.connection() as conn:
        await build_scenario(conn)
        await conn.execute(
            "INSERT INTO pgflow.dead_letters (consumer, event_id, foreign_id, type, reason,"
            " payload, attempts) VALUES ('payments', 'm-1', 'order-9', 'paid', 'bad json',"
            " '\"{oops\"', 1), ('payments', 'm-2', NULL, NULL, 'no foreign id', NULL, 3)"
        )
        await conn.execute(
            "UPDATE pgflow.dead_letters SET replayed_at = now() WHERE event_id = 'm-2'"
        )
        dlq = await rows(conn, "SELECT * FROM pgflow.dead_letter_queue ORDER BY id")
        counts = await rows(
            conn,
            "SELECT workflow, status, run_state, runs, erroring FROM pgflow.run_counts"
            " ORDER BY workflow, status, run_state",
        )
    assert [(d["event_id"], d["state"], d["reason"]) for d in dlq] == [
        ("m-1", "pending", "bad json"),
        ("m-2", "replayed", "no foreign id"),
    ]
    assert dlq[0]["payload"] == "{oops"
    assert ("orders", "CREATED", "INITIATED", 4, 1) in [tuple(c.values()) for c in counts]
    assert ("orders", "SHIPPED", "COMPLETED", 1, 0) in [tuple(c.values()) for c in counts]


async def test_views_survive_a_second_migrate(pgflow_dsn, pool) -> None:
    async with pool.connection() as conn:
        await build_scenario(conn)
    assert await migrate(pgflow_dsn) == []  # views re-applied with CREATE OR REPLACE
    async with pool.connection() as conn:
        got = await rows(conn, "SELECT count(*) AS n FROM pgflow.runs")
    assert got == [{"n": 7}]


async def test_views_cost_nothing_to_create_concurrently(pgflow_dsn) -> None:
    # Two migrations at once (two workers starting) must both succeed.
    assert await asyncio.gather(migrate(pgflow_dsn), migrate(pgflow_dsn)) == [[], []]
