"""`pgflow worker` options: the connection budget is configurable and validated."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pgflow.cli._common import build_workflow
from pgflow.errors import BuildError, ConfigError
from pgflow.testing import Connections

PGFLOW = str(Path(sys.executable).with_name("pgflow"))
ROOT = Path(__file__).resolve().parent.parent


def test_pool_size_applies_to_builders_and_workflows() -> None:
    dsn = "postgresql://postgres@127.0.0.1:5432/unused"  # nothing connects here
    assert Connections.of(build_workflow("tests.workflow_app:builder", dsn, 3)).pool_size == 3
    assert Connections.of(build_workflow("tests.workflow_app:wf", dsn, 4)).pool_size == 4
    assert Connections.of(build_workflow("tests.workflow_app:builder", dsn)).pool_size == 10
    with pytest.raises(BuildError, match="pool_size must be at least 2"):
        build_workflow("tests.workflow_app:builder", dsn, 1)
    with pytest.raises(ConfigError, match="at least 2"):
        build_workflow("tests.workflow_app:wf", dsn, 1)


def test_bad_pool_size_env_is_a_one_line_error() -> None:
    env = {**os.environ, "PGFLOW_POOL_SIZE": "lots", "PGFLOW_DATABASE_URL": "postgresql:///x"}
    result = subprocess.run(
        [PGFLOW, "worker", "tests.workflow_app:builder"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "pgflow: error: PGFLOW_POOL_SIZE must be a whole number, not 'lots'"
    )


async def test_one_worker_process_runs_several_workflows(pgflow_dsn: str) -> None:
    from pgflow.testing import require
    from tests._util import wait_until
    from tests.two_workflows_app import S, billing, shipping

    proc = await asyncio.create_subprocess_exec(
        PGFLOW,
        "worker",
        "tests.two_workflows_app:billing",
        "tests.two_workflows_app:shipping",
        "--dsn",
        pgflow_dsn,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        clients = [billing.build(pgflow_dsn), shipping.build(pgflow_dsn)]
        for i, client in enumerate(clients):
            await client.trigger(f"order-{i}")
        for i, client in enumerate(clients):
            assert (await require(client, f"order-{i}", S.DONE, timeout=20)).status is S.DONE

        async def one_listener() -> bool:
            with psycopg.connect(pgflow_dsn) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query ILIKE 'LISTEN%%'"
                ).fetchone()
            return row == (1,)

        await wait_until(one_listener, timeout=10, message="exactly one LISTEN connection")
        for client in clients:
            await client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out_b, err_b = await asyncio.wait_for(proc.communicate(), 30)
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 0, err
    assert "billing, shipping running" in out and "stopping" in out
