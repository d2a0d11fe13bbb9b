"""The connector runner's optimistic batches (pgflow._batch_api): one statement for a
batch's triggers, and the per-event semantics kept whenever a batch is not ordinary."""

from __future__ import annotations

import enum
from collections import Counter
from datetime import timedelta
from typing import Any

import psycopg

import pgflow
from pgflow.connectors import ConnectorEvent
from pgflow.connectors.memory import Connector as MemoryConnector
from pgflow.connectors.memory import event
from tests._util import wait_until


class S(enum.IntEnum):
    NEW = 1
    DONE = 2


async def _noop(run: Any, payload: Any) -> None:
    return None


def build(dsn: str, memory: MemoryConnector, fn: Any, **options: Any) -> pgflow.Workflow[Any, S]:
    # A callback (not a step) on NEW: runs stay in progress, so triggers can collide.
    b: pgflow.Builder[dict[str, Any], S] = pgflow.Builder("opt", dict, S)
    b.add_callback(S.NEW, _noop, S.DONE)
    options = {"batch_size": 100, "polling_frequency": 0.05, **options}
    b.add_connector("feed", memory, fn, **options)
    return b.build(dsn)


async def _runs(dsn: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT foreign_id, count(*) FROM pgflow.records WHERE workflow = 'opt' GROUP BY 1"
        )
        return {fid: n for fid, n in await cur.fetchall()}


async def test_a_batch_of_triggers_reads_its_own_writes_without_falling_back(
    pgflow_dsn: str,
) -> None:
    memory = MemoryConnector()
    seen: dict[str, tuple[bool, str]] = {}
    returned: dict[str, str] = {}

    async def fn(api: pgflow.API[dict[str, Any], S], ev: ConnectorEvent) -> None:
        if ev.type == "new":
            rid = pgflow.run_id_for("opt", ev.id)
            returned[ev.foreign_id] = await api.trigger(ev.foreign_id, {"n": ev.id}, run_id=rid)
        else:  # triggered earlier in the same batch: visible to reads
            seen[ev.foreign_id] = (
                await api.exists(ev.foreign_id),
                (await api.latest(ev.foreign_id)).run_id,
            )

    async with build(pgflow_dsn, memory, fn) as wf:
        runner = wf.runners[0]
        memory.append(
            *(event(f"n{i}", f"f{i}", "new") for i in range(40)),
            *(event(f"c{i}", f"f{i}", "check") for i in range(0, 40, 4)),
            *(event(f"n{i}", f"f{i}", "new") for i in range(40, 60)),
        )

        async def done() -> bool:
            return runner.handled == 70

        await wait_until(done, message="70 events handled")
        assert runner.fallbacks == 0  # every batch took the one-statement path
    assert seen == {f"f{i}": (True, returned[f"f{i}"]) for i in range(0, 40, 4)}
    assert await _runs(pgflow_dsn) == {f"f{i}": 1 for i in range(60)}
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT run_id), bool_and(version = 1),"
            " bool_and(headers->>'change' = 'trigger') FROM pgflow.events WHERE stream = 'opt'"
        )
        assert await cur.fetchone() == (60, 60, True, True)  # one first event per run


async def test_in_batch_repeats_behave_like_sequential_triggers(pgflow_dsn: str) -> None:
    memory = MemoryConnector()
    rids: dict[str, str] = {}
    in_progress: list[str] = []

    async def fn(api: pgflow.API[dict[str, Any], S], ev: ConnectorEvent) -> None:
        try:
            rid = pgflow.run_id_for("opt", ev.headers["key"])
            rids[ev.id] = await api.trigger(ev.foreign_id, run_id=rid)
        except pgflow.WorkflowInProgress:
            in_progress.append(ev.id)

    async with build(pgflow_dsn, memory, fn) as wf:
        runner = wf.runners[0]
        memory.append(
            event("a", "x", "t", key="k1"),
            event("a-again", "x", "t", key="k1"),  # redelivered: same run id
            event("b", "x", "t", key="k2"),  # a second run while the first is active
            event("c", "y", "t", key="k3"),
        )

        async def done() -> bool:
            return runner.handled == 4

        await wait_until(done, message="4 events handled")
        assert runner.fallbacks == 0
    assert rids["a"] == rids["a-again"] == pgflow.run_id_for("opt", "k1")
    assert in_progress == ["b"]
    assert await _runs(pgflow_dsn) == {"x": 1, "y": 1}


async def test_a_run_already_in_progress_falls_back_to_per_event(pgflow_dsn: str) -> None:
    memory = MemoryConnector()
    calls: Counter[str] = Counter()
    in_progress: list[str] = []

    async def fn(api: pgflow.API[dict[str, Any], S], ev: ConnectorEvent) -> None:
        calls[ev.id] += 1
        try:
            await api.trigger(ev.foreign_id, run_id=pgflow.run_id_for("opt", ev.id))
        except pgflow.WorkflowInProgress:
            in_progress.append(ev.id)

    async with build(pgflow_dsn, memory, fn) as wf:
        runner = wf.runners[0]
        await wf.trigger("busy")  # committed before the batch: the DB reports it
        memory.append(event("z1", "z1", "t"), event("b1", "busy", "t"), event("z2", "z2", "t"))

        async def done() -> bool:
            return runner.handled == 3

        await wait_until(done, message="3 events handled")
        assert runner.fallbacks == 1
    assert in_progress == ["b1"]  # raised once, on the per-event path
    assert calls == {"z1": 2, "b1": 2, "z2": 2}  # the optimistic attempt ran them first
    assert await _runs(pgflow_dsn) == {"busy": 1, "z1": 1, "z2": 1}


async def test_a_failing_function_does_not_poison_its_batch(pgflow_dsn: str) -> None:
    memory = MemoryConnector()
    failed: Counter[str] = Counter()
    calls: Counter[str] = Counter()

    async def fn(api: pgflow.API[dict[str, Any], S], ev: ConnectorEvent) -> None:
        calls[ev.id] += 1
        await api.trigger(ev.foreign_id, run_id=pgflow.run_id_for("opt", ev.id))
        if ev.id == "e6" or (ev.id == "e3" and not failed[ev.id]):
            failed[ev.id] += 1
            raise RuntimeError(f"{ev.id} failed")

    options = {"max_retries": 2, "err_backoff": timedelta(milliseconds=10)}
    async with build(pgflow_dsn, memory, fn, **options) as wf:
        runner = wf.runners[0]
        memory.append(*(event(f"e{i}", f"f{i}", "t") for i in range(10)))

        async def done() -> bool:
            return runner.handled == 9 and runner.dead == 1

        await wait_until(done, message="9 handled, e6 dead-lettered")
        # the events around a failing one are not run again (issue 9): their runs are
        # re-written after the attempt rolled back; no fallback to the per-event path
        assert runner.fallbacks == 0
    assert calls == {**{f"e{i}": 1 for i in range(10)}, "e3": 2, "e6": 2}
    expected = {f"f{i}": 1 for i in range(10) if i != 6}
    assert await _runs(pgflow_dsn) == expected  # e6's trigger rolled back with it
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        cur = await conn.execute("SELECT event_id, reason FROM pgflow.dead_letters")
        assert await cur.fetchall() == [("e6", "RuntimeError: e6 failed")]


async def test_raw_sql_on_api_conn_takes_the_per_event_path(pgflow_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE seen (event_id text, runs bigint)")
    memory = MemoryConnector()

    async def fn(api: pgflow.API[dict[str, Any], S], ev: ConnectorEvent) -> None:
        await api.trigger(ev.foreign_id, run_id=pgflow.run_id_for("opt", ev.id))
        assert api.conn is not None
        await api.conn.execute(  # must see this event's run: ordering is kept
            "INSERT INTO seen SELECT %s, count(*) FROM pgflow.records WHERE foreign_id = %s",
            (ev.id, ev.foreign_id),
        )

    async with build(pgflow_dsn, memory, fn) as wf:
        runner = wf.runners[0]
        memory.append(*(event(f"e{i}", f"f{i}", "t") for i in range(20)))

        async def done() -> bool:
            return runner.handled == 20

        await wait_until(done, message="20 events handled")
        assert runner.fallbacks >= 1
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        cur = await conn.execute("SELECT count(*), bool_and(runs = 1) FROM seen")
        assert await cur.fetchone() == (20, True)


async def test_bad_events_do_not_rerun_the_good_ones(pgflow_dsn: str) -> None:
    """9 bad events among 300: every good event's function runs exactly once, every
    bad one max_retries times, and each good event has its run (issue 9, item 6)."""
    memory = MemoryConnector()
    calls: Counter[str] = Counter()
    bad = {f"e{i}" for i in range(5, 300, 33)}

    async def fn(api: pgflow.API[dict[str, Any], S], ev: ConnectorEvent) -> None:
        calls[ev.id] += 1
        await api.trigger(ev.foreign_id, run_id=pgflow.run_id_for("opt", ev.id))
        if ev.id in bad:
            raise RuntimeError(f"{ev.id} is bad")

    options = {"max_retries": 3, "err_backoff": timedelta(milliseconds=5), "batch_size": 50}
    async with build(pgflow_dsn, memory, fn, **options) as wf:
        runner = wf.runners[0]
        memory.append(*(event(f"e{i}", f"f{i}", "t") for i in range(300)))

        async def done() -> bool:
            return runner.handled + runner.dead == 300

        await wait_until(done, timeout=60, message="300 events handled or dead-lettered")
    assert len(bad) == 9 and runner.dead == 9
    assert {k: v for k, v in calls.items() if v != 1} == {e: 3 for e in bad}
    runs = await _runs(pgflow_dsn)
    assert len(runs) == 291 and set(runs.values()) == {1}
