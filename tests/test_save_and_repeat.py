"""run.skip(), run.save_and_repeat() (luno ``SaveAndRepeat``) and wf.states()."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import psycopg

import pgflow
from pgflow import ConsumerState, RunState
from pgflow.testing import require
from tests._util import wait_until


class S(enum.IntEnum):
    IMPORTING = 1
    IMPORTED = 2


@dataclass
class Job:
    done: int = 0
    total: int = 0
    chunks: list[int] = field(default_factory=list)


def import_workflow(dsn: str, chunk: int = 3, **options: Any) -> pgflow.Workflow[Job, S]:
    """A long batch job worked in chunks: each chunk is committed with its progress."""
    b = pgflow.Builder("imports", Job, S, polling_frequency=0.05)

    @b.step(S.IMPORTING, to=[S.IMPORTED], **options)
    async def work(run: pgflow.Run[Job, S]) -> S | None:
        if run.object.total == 0:  # nothing to do yet
            return await run.skip()
        n = min(chunk, run.object.total - run.object.done)
        await run.tx.execute(
            "INSERT INTO imported SELECT %s, g FROM generate_series(%s::int, %s::int) g",
            (run.foreign_id, run.object.done + 1, run.object.done + n),
        )
        run.object.done += n
        run.object.chunks.append(n)
        if run.object.done < run.object.total:
            return await run.save_and_repeat()  # type: ignore[func-returns-value]
        return S.IMPORTED

    return b.build(dsn)


async def test_save_and_repeat_commits_progress_and_runs_again(pgflow_dsn: str) -> None:
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE imported (job text, n int, PRIMARY KEY (job, n))")
    async with import_workflow(pgflow_dsn) as wf:
        await wf.trigger("big", initial=Job(total=10))
        await wf.trigger("small", initial=Job(total=2))
        await wf.trigger("empty", initial=Job())
        rec = await require(wf, "big", S.IMPORTED, Job(done=10, total=10, chunks=[3, 3, 3, 1]))
        assert rec.run_state is RunState.COMPLETED
        await require(wf, "small", S.IMPORTED, Job(2, 2, [2]))
        skipped = await wf.latest("empty")
        assert (skipped.status, skipped.version) == (S.IMPORTING, 1)  # skip: no change
    with psycopg.connect(pgflow_dsn) as conn:
        rows = conn.execute("SELECT job, count(*), max(n) FROM imported GROUP BY 1 ORDER BY 1")
        assert rows.fetchall() == [("big", 10, 10), ("small", 2, 2)]  # each row once
        changes = conn.execute(
            "SELECT change, status, run_state FROM pgflow.run_history WHERE foreign_id = 'big'"
            " ORDER BY step"
        ).fetchall()
    assert changes == [
        ("trigger", "IMPORTING", "INITIATED"),
        ("save_and_repeat", "IMPORTING", "RUNNING"),
        ("save_and_repeat", "IMPORTING", "RUNNING"),
        ("save_and_repeat", "IMPORTING", "RUNNING"),
        ("step", "IMPORTED", "COMPLETED"),
    ]


async def test_repeat_goes_to_the_back_of_the_log(pgflow_dsn: str) -> None:
    """A repeating run does not starve others in its shard: their events come first."""
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE imported (job text, n int, PRIMARY KEY (job, n))")
    async with import_workflow(pgflow_dsn, chunk=1, batch_size=1) as wf:
        await wf.trigger("long", initial=Job(total=30))
        for i in range(5):
            await wf.trigger(f"quick{i}", initial=Job(total=1))
        for i in range(5):
            await require(wf, f"quick{i}", S.IMPORTED)
        long = await wf.latest("long")
        assert long.status is S.IMPORTING and long.object.done < 30
        await require(wf, "long", S.IMPORTED, timeout=30)


async def test_states_of_this_process(pgflow_dsn: str) -> None:
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE imported (job text, n int, PRIMARY KEY (job, n))")
    wf = import_workflow(pgflow_dsn, parallel_count=2)
    assert wf.states() == {}
    other = import_workflow(pgflow_dsn, parallel_count=2)
    async with wf:

        async def settled() -> bool:
            return all(s is not ConsumerState.STARTING for s in wf.states().values())

        await wait_until(settled, message="every consumer tried a batch")
        states = wf.states()
        assert set(states) == {"imports/IMPORTING[1/2]", "imports/IMPORTING[2/2]", "imports/poller"}
        assert set(states.values()) == {ConsumerState.RUNNING}
        async with other:
            # the second process stands by while the first holds the shards ... mostly:
            # shard locks are per batch, so either may hold one at any moment
            await wait_until(
                lambda: _true(
                    all(s is not ConsumerState.STARTING for s in other.states().values())
                ),
                message="second process settled",
            )
            assert set(other.states().values()) <= {ConsumerState.RUNNING, ConsumerState.IDLE}
    assert wf.states() == {}


async def _true(value: bool) -> bool:
    return value
