"""The views over runs made by the real engine (in-process workflow), incl. a failing step."""

from __future__ import annotations

import enum
from typing import Any

import psycopg

import pgflow
from pgflow import observability as obs
from tests._util import wait_until


class S(enum.IntEnum):
    NEW = 1
    CHECKED = 2
    DONE = 3


async def test_engine_runs_read_well_in_the_views(pgflow_dsn: str) -> None:
    failures = {"bad-1": 1}  # fail the first attempt of bad-1's first step

    async def check(run: pgflow.Run[dict[str, Any], S]) -> S:
        if failures.get(run.foreign_id, 0) > 0:
            failures[run.foreign_id] -= 1
            raise RuntimeError("card declined")
        return S.CHECKED

    async def finish(run: pgflow.Run[dict[str, Any], S]) -> S:
        return S.DONE

    b = pgflow.Builder("shop", dict, S, polling_frequency=0.05, err_backoff=0.05)
    b.add_step(S.NEW, check, S.CHECKED)
    b.add_step(S.CHECKED, finish, S.DONE)
    obs.reset()
    wf = b.build(pgflow_dsn)
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:

        async def fetch(sql: str, *params: Any) -> list[tuple[Any, ...]]:
            cur = await conn.execute(sql, params or None)
            return list(await cur.fetchall())

        async with wf:
            for fid in ("good-1", "bad-1"):
                await wf.trigger(fid, initial={"n": 1})

            async def both_done() -> bool:
                rows = await fetch(
                    "SELECT count(*) FROM pgflow.runs WHERE workflow = 'shop'"
                    " AND run_state = 'COMPLETED'"
                )
                return rows[0][0] == 2

            await wait_until(both_done, timeout=30, message="both runs to complete")

        good = await fetch(
            "SELECT step, from_status, status, change, run_state FROM pgflow.run_history"
            " WHERE workflow = 'shop' AND foreign_id = 'good-1' ORDER BY step"
        )
        assert good == [
            (1, None, "NEW", "trigger", "INITIATED"),
            (2, "NEW", "CHECKED", "step", "RUNNING"),
            (3, "CHECKED", "DONE", "step", "COMPLETED"),
        ]
        # The failed attempt is not a transition; the run's moves read the same.
        bad = await fetch(
            "SELECT status, run_state FROM pgflow.run_history"
            " WHERE workflow = 'shop' AND foreign_id = 'bad-1' AND change <> 'retry'"
            " ORDER BY step"
        )
        assert [b[0] for b in bad] == ["NEW", "CHECKED", "DONE"]
        runs = await fetch(
            "SELECT foreign_id, status, run_state, err_count, last_error, trace_id"
            " FROM pgflow.runs WHERE workflow = 'shop' ORDER BY foreign_id"
        )
        assert [r[:5] for r in runs] == [
            ("bad-1", "DONE", "COMPLETED", 0, None),
            ("good-1", "DONE", "COMPLETED", 0, None),
        ]
        assert await fetch("SELECT * FROM pgflow.stuck_runs") == []
        lag = await fetch(
            "SELECT consumer, lag_events FROM pgflow.consumer_lag"
            " WHERE stream = 'shop' ORDER BY consumer"
        )
        assert lag == [("shop/CHECKED", 0), ("shop/NEW", 0)]
