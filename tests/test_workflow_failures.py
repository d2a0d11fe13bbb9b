"""Step failures, retries and pauses; timeouts; cron schedules."""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import psycopg

import pgflow
from pgflow import RunState
from pgflow.testing import require, require_state
from tests._util import wait_until


class S(enum.IntEnum):
    START = 1
    MIDDLE = 2
    END = 3
    EXPIRED = 4


async def test_failing_step_retries_then_pauses_without_blocking_its_shard(
    pgflow_dsn: str,
) -> None:
    attempts: Counter[str] = Counter()
    paused: list[tuple[str, int]] = []
    b = pgflow.Builder("flaky", dict, S, polling_frequency=0.1)

    @b.step(S.START, to=[S.END], err_backoff=0.05, pause_after_err_count=3, batch_size=10)
    async def work(run: pgflow.Run[dict[str, Any], S]) -> S:
        attempts[run.foreign_id] += 1
        if run.foreign_id == "poison":
            raise ValueError("poison pill")
        if run.foreign_id == "flaky" and attempts["flaky"] <= 2:
            raise ConnectionError("try again")
        return S.END

    @b.on_pause
    async def on_pause(run: pgflow.Run[dict[str, Any], S]) -> None:
        paused.append((run.foreign_id, run.err_count))

    async with b.build(pgflow_dsn) as wf:
        # One shard: the poison run sits in the same batches as the good ones.
        await wf.trigger("poison")
        await wf.trigger("flaky")
        for i in range(20):
            await wf.trigger(f"good{i}")
        for i in range(20):
            rec = await require(wf, f"good{i}", S.END)
            assert rec.run_state is RunState.COMPLETED
        rec = await require(wf, "flaky", S.END)
        assert rec.err_count == 0 and rec.last_error is None
        assert attempts["flaky"] == 3
        rec = await require_state(wf, "poison", RunState.PAUSED)
        assert rec.err_count == 3
        assert rec.last_error and rec.last_error.startswith("ValueError: poison pill\nTraceback")
        assert attempts["poison"] == 3
        # on_pause runs after commit, from the event log
        await wait_until(lambda: _is(paused == [("poison", 3)]), message="on_pause")
        assert all(attempts[f"good{i}"] == 1 for i in range(20))
        # resume: errors reset, the step runs again (and fails again, 3 more times).
        await wf.resume("poison")
        await wait_until(lambda: _is(attempts["poison"] == 6), message="3 more attempts")
        rec = await require_state(wf, "poison", RunState.PAUSED)
        assert rec.err_count == 3
        # retry of a paused run works the same way from the admin API
        await wf.retry("poison")
        await wait_until(lambda: _is(attempts["poison"] == 9), message="3 more attempts")


async def _is(value: bool) -> bool:
    return value


def timeout_workflow(dsn: str, fired: list[str]) -> pgflow.Workflow[dict[str, Any], S]:
    b = pgflow.Builder("timeouts", dict, S, polling_frequency=0.1)
    b.add_step(S.START, lambda run: S.MIDDLE, S.MIDDLE)

    def timer(run: pgflow.Run[dict[str, Any], S], now: datetime) -> datetime | None:
        if run.object.get("no_timer"):
            return None
        return now + timedelta(seconds=0.3)

    async def expire(run: pgflow.Run[dict[str, Any], S], now: datetime) -> S:
        fired.append(run.foreign_id)
        run.object["expired_at"] = now.isoformat()
        return S.EXPIRED

    b.add_timeout(S.MIDDLE, timer, expire, S.EXPIRED)
    b.add_callback(S.MIDDLE, lambda run, payload: S.END, S.END)
    return b.build(dsn)


async def test_timeouts_fire_exactly_once_across_processes(pgflow_dsn: str) -> None:
    fired: list[str] = []
    # Two Workflow instances = two worker processes competing for the same timeouts.
    async with timeout_workflow(pgflow_dsn, fired) as wf, timeout_workflow(pgflow_dsn, fired):
        for i in range(10):
            await wf.trigger(f"t{i}")
        await wf.trigger("answered")
        await wf.trigger("untimed", initial={"no_timer": True})
        await require(wf, "answered", S.MIDDLE)
        await wf.callback("answered", S.MIDDLE, None)  # moves on before the timeout
        for i in range(10):
            rec = await require(wf, f"t{i}", S.EXPIRED)
            assert rec.run_state is RunState.COMPLETED
            assert "expired_at" in rec.object
        await require(wf, "untimed", S.MIDDLE)
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            await wait_until(lambda: _all_completed(conn), message="every timeout row claimed")
            cur = await conn.execute(
                "SELECT count(*) FROM pgflow.timeouts WHERE foreign_id = 'untimed'"
            )
            assert await cur.fetchone() == (0,)  # its timer returned None
    assert sorted(fired) == sorted(f"t{i}" for i in range(10))
    rec = await wf.latest("answered")
    assert rec.status is S.END


async def _all_completed(conn: psycopg.AsyncConnection[Any]) -> bool:
    cur = await conn.execute("SELECT bool_and(completed) FROM pgflow.timeouts")
    row = await cur.fetchone()
    return bool(row and row[0])


async def test_failing_expire_is_retried(pgflow_dsn: str) -> None:
    calls: Counter[str] = Counter()
    b = pgflow.Builder("texp", dict, S, polling_frequency=0.1)

    def expire(run: pgflow.Run[dict[str, Any], S], now: datetime) -> S:
        calls[run.foreign_id] += 1
        if calls[run.foreign_id] < 3:
            raise RuntimeError("not yet")
        return S.EXPIRED

    b.add_timeout(S.START, lambda run, now: now, expire, S.EXPIRED, err_backoff=0.05)
    async with b.build(pgflow_dsn) as wf:
        await wf.trigger("x")
        rec = await require(wf, "x", S.EXPIRED)
        assert rec.run_state is RunState.COMPLETED
    assert calls["x"] == 3


async def test_schedule_triggers_once_per_tick(pgflow_dsn: str) -> None:
    b = pgflow.Builder("cron", dict, S, polling_frequency=0.1)
    b.add_step(S.START, lambda run: S.END, S.END)
    wf = b.build(pgflow_dsn)
    other = b.build(pgflow_dsn)
    async with wf, other:
        with __import__("pytest").raises(pgflow.ConfigError):
            await wf.schedule("nightly", "not a cron")
        await wf.schedule("nightly", "* * * * *")
        # prepare_threshold=None: tests/test_pooled.py runs this through pgbouncer too
        async with await psycopg.AsyncConnection.connect(
            pgflow_dsn, autocommit=True, prepare_threshold=None
        ) as conn:
            for _ in range(3):
                # Make the tick due now (instead of waiting for the next minute).
                await conn.execute(
                    "UPDATE pgflow.schedules SET next_at = now() - interval '1 second'"
                )
                await wait_until(lambda: _schedule_moved(conn), message="tick consumed")
                await require(wf, "nightly", S.END)
            cur = await conn.execute(
                "SELECT count(*), count(DISTINCT e.headers->>'tick') FROM pgflow.events e"
                " WHERE e.stream = 'cron' AND e.type = 'START'"
            )
            assert await cur.fetchone() == (3, 3)
        await asyncio.sleep(0)


async def _schedule_moved(conn: psycopg.AsyncConnection[Any]) -> bool:
    cur = await conn.execute("SELECT next_at > now() FROM pgflow.schedules")
    row = await cur.fetchone()
    return bool(row and row[0])
