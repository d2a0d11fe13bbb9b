"""schedule(foreign_id, spec, initial=..., filter=fn) (luno WithScheduleInitialValue,
WithScheduleFilter), driven by a test clock."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow.testing import Clock, require
from tests._util import wait_until


class S(enum.IntEnum):
    START = 1
    END = 2


@dataclass
class Report:
    kind: str = "default"
    ticks: int = 0


def report_workflow(dsn: str, clock: Clock) -> pgflow.Workflow[Report, S]:
    b = pgflow.Builder("reports", Report, S, polling_frequency=0.05)
    b.add_step(S.START, lambda run: S.END, S.END)
    return b.build(dsn, clock=clock)


def ticks(dsn: str, foreign_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT r.object FROM pgflow.records r WHERE r.foreign_id = %s ORDER BY created_at",
            (foreign_id,),
        ).fetchall()
    return [r[0] for r in rows]


async def test_initial_value_and_filter(pgflow_dsn: str) -> None:
    clock = Clock(datetime(2026, 5, 4, 8, 59, 30, tzinfo=UTC))  # a Monday
    seen: list[datetime] = []

    def weekdays_only(tick: datetime) -> bool:
        seen.append(tick)
        return tick.weekday() < 5

    async with report_workflow(pgflow_dsn, clock) as wf:
        first = await wf.schedule(
            "daily", "0 9 * * *", initial=Report(kind="sales"), filter=weekdays_only
        )
        assert first == datetime(2026, 5, 4, 9, tzinfo=UTC)
        await wf.schedule("plain", "0 9 * * *")
        for day in range(7):  # Monday .. Sunday
            clock.set(datetime(2026, 5, 4 + day, 9, 0, 1, tzinfo=UTC))

            async def ticked(day: int = day) -> bool:
                return len(ticks(pgflow_dsn, "plain")) == day + 1

            await wait_until(ticked, message=f"tick of day {day}")
            await require(wf, "plain", S.END)
            await wait_until(lambda day=day: _true(len(seen) == day + 1), message="filter ran")
            if seen[-1].weekday() < 5:
                await require(wf, "daily", S.END)
        assert [t.weekday() for t in seen] == [0, 1, 2, 3, 4, 5, 6]
        assert ticks(pgflow_dsn, "daily") == [{"kind": "sales", "ticks": 0}] * 5
        assert ticks(pgflow_dsn, "plain") == [{"kind": "default", "ticks": 0}] * 7


async def test_a_filtered_schedule_fires_only_where_its_filter_lives(pgflow_dsn: str) -> None:
    clock = Clock(datetime(2026, 5, 4, 8, 0, tzinfo=UTC))
    calls: list[str] = []
    owner = report_workflow(pgflow_dsn, clock)
    stranger = report_workflow(pgflow_dsn, clock)  # another process, no filter registered
    async with stranger:
        await owner.schedule("f", "0 * * * *", filter=lambda tick: calls.append("x") or True)
        clock.advance(timedelta(hours=1, seconds=1))
        await wait_until(lambda: _true(True), timeout=0.5)
        assert ticks(pgflow_dsn, "f") == []  # the stranger cannot judge it: left alone
        async with owner:
            await require(owner, "f", S.END)
    assert calls == ["x"]


async def test_failing_filter_skips_the_tick_without_spinning(pgflow_dsn: str) -> None:
    clock = Clock(datetime(2026, 5, 4, 8, 0, tzinfo=UTC))
    calls: list[int] = []

    def broken(tick: datetime) -> bool:
        calls.append(1)
        raise RuntimeError("filter down")

    async with report_workflow(pgflow_dsn, clock) as wf:
        await wf.schedule("b", "0 * * * *", filter=broken)
        clock.advance(timedelta(hours=1, seconds=1))
        await wait_until(lambda: _true(len(calls) == 1), message="filter called")

        async def skipped() -> bool:  # the skip commits a moment after the call
            with psycopg.connect(pgflow_dsn) as conn:
                row = conn.execute("SELECT next_at FROM pgflow.schedules").fetchone()
            return row == (datetime(2026, 5, 4, 10, tzinfo=UTC),)

        await wait_until(skipped, message="the tick skipped to 10:00")
        await wait_until(lambda: _true(True), timeout=0.5)
        assert len(calls) == 1 and ticks(pgflow_dsn, "b") == []
        with pytest.raises(pgflow.ConfigError, match="filter must be callable"):
            await wf.schedule("b", "0 * * * *", filter=42)  # type: ignore[arg-type]


async def _true(value: bool) -> bool:
    return value
