"""Crash consistency: SIGKILLed worker processes, takeover, exactly-once effects."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from tests import workflow_app
from tests._util import wait_until

ROOT = Path(__file__).resolve().parent.parent
RUNS = 300


def start_worker(dsn: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PGFLOW_DATABASE_URL": dsn,
        "PYTHONPATH": str(ROOT),
        "PGFLOW_TEST_STEP_DELAY": "0.005",  # a batch of 20 takes ~100 ms: kills land in one
    }
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "pgflow"), "worker", "tests.workflow_app:wf"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def scalar(conn: psycopg.AsyncConnection[Any], sql: str) -> Any:
    cur = await conn.execute(sql)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def test_sigkilled_workers_lose_and_double_nothing(pgflow_dsn: str) -> None:
    conn = await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        await conn.execute(workflow_app.APP_TABLES)
        wf = workflow_app.make_builder().build(pgflow_dsn)
        workers += [start_worker(pgflow_dsn), start_worker(pgflow_dsn)]
        for i in range(RUNS):
            await wf.trigger(f"r{i}")
        await wf.close()

        async def progressed(n: int) -> bool:
            return await scalar(conn, "SELECT count(*) FROM effect_log") >= n

        # Kill the first worker in the middle of its batches...
        await wait_until(lambda: progressed(RUNS // 3), timeout=60, message="progress")
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        assert not await progressed(3 * RUNS), "the kill should land mid-way"
        # ...start a replacement, then kill the second one too.
        workers.append(start_worker(pgflow_dsn))
        await wait_until(lambda: progressed(2 * RUNS), timeout=60, message="more progress")
        workers[1].send_signal(signal.SIGKILL)
        workers[1].wait()
        assert not await progressed(3 * RUNS), "the kill should land mid-way"

        async def all_done() -> bool:
            return (
                await scalar(
                    conn,
                    "SELECT count(*) FROM pgflow.records WHERE run_state = 'COMPLETED'",
                )
                == RUNS
            )

        await wait_until(all_done, timeout=90, interval=0.2, message="every run completed")
        assert await scalar(conn, "SELECT count(*) FROM effects") == 3 * RUNS
        # No step's effect was committed twice...
        assert (
            await scalar(
                conn,
                "SELECT count(*) FROM (SELECT 1 FROM effect_log GROUP BY foreign_id, step"
                " HAVING count(*) > 1) d",
            )
            == 0
        )
        assert await scalar(conn, "SELECT count(*) FROM effect_log") == 3 * RUNS
        # ...and no step ever failed (a replay would have hit the unique constraint).
        assert (
            await scalar(conn, "SELECT count(*) FROM pgflow.records WHERE last_error IS NOT NULL")
            == 0
        )
        assert await scalar(conn, "SELECT max(version) FROM pgflow.records") == 4
        # The survivor stops cleanly on SIGTERM.
        survivor = workers[2]
        survivor.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(survivor.communicate, timeout=30)
        assert survivor.returncode == 0, err.decode()
        assert b"stopping" in out
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        await conn.close()
