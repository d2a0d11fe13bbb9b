"""Several timeouts per status, timer helpers, and the controllable clock."""

from __future__ import annotations

import enum
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

import pgflow
from pgflow import RunState
from pgflow.testing import Clock, await_timeout_insert, require, require_state
from pgflow.workflow.timers import after, at, daily_at
from tests._util import wait_until


class S(enum.IntEnum):
    START = 1
    WAITING = 2
    ANSWERED = 3
    EXPIRED = 4


def reminder_workflow(
    dsn: str, clock: Clock, log: list[tuple[str, str]]
) -> pgflow.Workflow[dict[str, Any], S]:
    """WAITING has two timeouts: a reminder after 1 day (stays) and an expiry after 3."""
    b = pgflow.Builder("reminders", dict, S, polling_frequency=0.05)
    b.add_step(S.START, lambda run: S.WAITING, S.WAITING)

    def remind(run: pgflow.Run[dict[str, Any], S], now: datetime) -> None:
        log.append(("remind", run.foreign_id))
        run.object["reminded"] = True  # not stored: no transition

    def expire(run: pgflow.Run[dict[str, Any], S], now: datetime) -> S:
        log.append(("expire", run.foreign_id))
        run.object["expired_at"] = now.isoformat()
        return S.EXPIRED

    b.add_timeout(S.WAITING, after(timedelta(days=1)), remind, S.EXPIRED)
    b.add_timeout(S.WAITING, after(timedelta(days=3)), expire, S.EXPIRED)
    b.add_callback(S.WAITING, lambda run, payload: S.ANSWERED, S.ANSWERED)
    return b.build(dsn, clock=clock)


async def test_two_timeouts_on_one_status_with_a_test_clock(pgflow_dsn: str) -> None:
    clock = Clock(datetime(2026, 3, 1, 12, tzinfo=UTC))
    log: list[tuple[str, str]] = []
    async with reminder_workflow(pgflow_dsn, clock, log) as wf:
        await wf.trigger("a")
        await wf.trigger("b")
        due = await await_timeout_insert(wf, "a", S.WAITING)
        assert due == [clock.now() + timedelta(days=1), clock.now() + timedelta(days=3)]
        await await_timeout_insert(wf, "b", S.WAITING)
        clock.advance(timedelta(days=1, seconds=1))
        await wait_until(lambda: _has(log, ("remind", "b")), message="both reminders")
        assert sorted(log) == [("remind", "a"), ("remind", "b")]
        assert (await wf.latest("a")).status is S.WAITING
        await wf.callback("b", S.WAITING)  # b answers: its expiry is void
        clock.advance(timedelta(days=2))
        rec = await require(wf, "a", S.EXPIRED)
        assert rec.run_state is RunState.COMPLETED
        assert rec.object["expired_at"] == clock.now().isoformat()
        assert (await wf.latest("b")).status is S.ANSWERED
        with psycopg.connect(pgflow_dsn) as conn:
            left = conn.execute("SELECT count(*) FROM pgflow.timeouts WHERE NOT completed")
            assert left.fetchone() == (0,)
    assert sorted(log) == [("expire", "a"), ("remind", "a"), ("remind", "b")]


async def test_first_timeout_to_move_the_run_voids_its_siblings(pgflow_dsn: str) -> None:
    """Both due in the same poll: exactly one moves the run, the other is void (not an
    error, not a second transition)."""
    clock = Clock()
    fired: list[str] = []
    b = pgflow.Builder("race", dict, S, polling_frequency=0.05)

    def first(run: pgflow.Run[dict[str, Any], S], now: datetime) -> S:
        fired.append("first")
        return S.EXPIRED

    async def second(run: pgflow.Run[dict[str, Any], S], now: datetime) -> S:
        fired.append("second")
        await run.tx.execute("CREATE TABLE IF NOT EXISTS side (x int)")
        await run.tx.execute("INSERT INTO side VALUES (1)")
        return S.ANSWERED

    b.add_timeout(S.WAITING, after(60), first, S.EXPIRED)
    b.add_timeout(S.WAITING, after(60), second, S.ANSWERED)
    async with b.build(pgflow_dsn, clock=clock) as wf:
        for i in range(5):
            await wf.trigger(f"r{i}", start_at=S.WAITING)
        for i in range(5):
            await await_timeout_insert(wf, f"r{i}", S.WAITING)
        clock.advance(120)
        for i in range(5):
            await require_state(wf, f"r{i}", RunState.COMPLETED)
            rec = await wf.latest(f"r{i}")
            assert rec.status in (S.EXPIRED, S.ANSWERED) and rec.version == 2
            assert rec.err_count == 0
        answered = sum([(await wf.latest(f"r{i}")).status is S.ANSWERED for i in range(5)])
    assert len(fired) == 5
    with psycopg.connect(pgflow_dsn) as conn:
        exists = conn.execute("SELECT to_regclass('side') IS NOT NULL").fetchone()
        rows = conn.execute("SELECT count(*) FROM side").fetchone() if exists == (True,) else (0,)
    assert rows == (answered,)  # a voided expire's writes roll back with it


async def test_failing_step_retry_follows_the_clock(pgflow_dsn: str) -> None:
    clock = Clock()
    attempts: list[datetime] = []
    b = pgflow.Builder("retry-clock", dict, S, polling_frequency=0.05)

    @b.step(S.START, to=[S.WAITING], err_backoff=timedelta(hours=1))
    def flaky(run: pgflow.Run[dict[str, Any], S]) -> S:
        attempts.append(clock.now())
        if len(attempts) < 2:
            raise RuntimeError("down for an hour")
        return S.WAITING

    b.add_callback(S.WAITING, lambda run, payload: S.ANSWERED, S.ANSWERED)
    async with b.build(pgflow_dsn, clock=clock) as wf:
        await wf.trigger("x")
        await wait_until(lambda: _true(len(attempts) == 1), message="first attempt")

        async def error_recorded() -> bool:  # the step ran; its batch commits a moment later
            return (await wf.latest("x")).err_count == 1

        await wait_until(error_recorded, message="the error recorded")
        clock.advance(timedelta(minutes=59))
        await wait_until(lambda: _true(True), timeout=0.3)
        assert len(attempts) == 1  # not due yet on the test clock
        clock.advance(timedelta(minutes=2))
        await require(wf, "x", S.WAITING)
    assert attempts[1] - attempts[0] == timedelta(minutes=61)


async def test_pause_retry_follows_the_clock(pgflow_dsn: str) -> None:
    clock = Clock()
    calls: list[int] = []
    b = pgflow.Builder("pause-clock", dict, S, polling_frequency=0.05)

    @b.step(S.START, to=[S.WAITING], err_backoff=0.01, pause_after_err_count=1)
    def once(run: pgflow.Run[dict[str, Any], S]) -> S:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return S.WAITING

    b.add_callback(S.WAITING, lambda run, payload: S.ANSWERED, S.ANSWERED)
    async with b.build(pgflow_dsn, clock=clock) as wf:
        await wf.trigger("p")
        await require_state(wf, "p", RunState.PAUSED)
        clock.advance(timedelta(minutes=59))
        assert (await wf.latest("p")).run_state is RunState.PAUSED
        clock.advance(timedelta(minutes=2))
        rec = await require(wf, "p", S.WAITING)
        # still RUNNING since the automatic resume: the reason says how it got there
        assert rec.run_state_reason == "pause_retry: resumed automatically"
    assert len(calls) == 2


def test_timer_helpers() -> None:
    now = datetime(2026, 3, 28, 9, 30, tzinfo=UTC)
    assert after(90)(None, now) == now + timedelta(seconds=90)
    assert after(timedelta(days=3))(None, now) == now + timedelta(days=3)
    assert at(datetime(2026, 4, 1))(None, now) == datetime(2026, 4, 1, tzinfo=UTC)
    nine = daily_at(time(9))
    assert nine(None, now) == datetime(2026, 3, 29, 9, tzinfo=UTC)  # 09:30 -> tomorrow
    assert nine(None, now.replace(hour=8)) == datetime(2026, 3, 28, 9, tzinfo=UTC)
    assert nine(None, now.replace(hour=9, minute=0)) == datetime(2026, 3, 29, 9, tzinfo=UTC)
    # Amsterdam moves to summer time on 2026-03-29: 09:00 local is 08:00 UTC, then 07:00
    ams = daily_at(time(9), "Europe/Amsterdam")
    saturday = ams(None, datetime(2026, 3, 28, 7, 0, tzinfo=UTC))
    sunday = ams(None, saturday)
    assert saturday == datetime(2026, 3, 28, 8, tzinfo=UTC)
    assert sunday.astimezone(UTC) == datetime(2026, 3, 29, 7, tzinfo=UTC)
    assert sunday.astimezone(ZoneInfo("Europe/Amsterdam")).hour == 9
    with pytest.raises(ValueError, match="must not be negative"):
        after(-1)


def test_clock_only_moves_forward() -> None:
    clock = Clock(datetime(2026, 1, 1))
    assert clock.now() == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-5)


async def _has(log: list[tuple[str, str]], item: tuple[str, str]) -> bool:
    return item in log


async def _true(value: bool) -> bool:
    return value
