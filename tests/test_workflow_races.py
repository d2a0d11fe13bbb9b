"""Races between a step and API calls on the same run.

A step that writes through ``run.tx`` must never commit those writes without its
transition: if the run moved concurrently (here: paused by another connection while the
step ran), the step's writes roll back with the stale transition.
"""

from __future__ import annotations

import enum
from typing import Any

import psycopg

import pgflow
from pgflow import RunState
from pgflow.testing import require, require_state


class S(enum.IntEnum):
    START = 1
    END = 2


async def test_step_writes_roll_back_when_the_run_moved_concurrently(pgflow_dsn: str) -> None:
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE effects (foreign_id text PRIMARY KEY)")
    b = pgflow.Builder("race", dict, S, polling_frequency=0.05)
    wf_ref: list[pgflow.Workflow[dict[str, Any], S]] = []

    @b.step(S.START, to=[S.END], batch_size=10)
    async def work(run: pgflow.Run[dict[str, Any], S]) -> S:
        await run.tx.execute("INSERT INTO effects VALUES (%s)", (run.foreign_id,))
        if run.foreign_id == "raced":
            # Another connection pauses this run while the step is still running:
            # the step's record is now stale.
            await wf_ref[0].pause(run.foreign_id, run.run_id)
        return S.END

    async with b.build(pgflow_dsn) as wf:
        wf_ref.append(wf)
        await wf.trigger("raced")
        await wf.trigger("calm")
        assert (await require(wf, "calm", S.END)).run_state is RunState.COMPLETED
        rec = await require_state(wf, "raced", RunState.PAUSED)
        assert rec.status is S.START  # the transition did not happen...
    with psycopg.connect(pgflow_dsn) as conn:
        rows = conn.execute("SELECT foreign_id FROM effects ORDER BY 1").fetchall()
    assert rows == [("calm",)]  # ...so neither did its write
