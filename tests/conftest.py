"""Shared fixtures: every test gets a fresh migrated database on a real PostgreSQL."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from tests._pgbouncer import PgBouncer, pgbouncer

if TYPE_CHECKING:  # imported by pytest_plugins below (so that pytest rewrites it)
    from pgflow.testing import TestDatabases

pytest_plugins = ["pgflow.testing", "tests._brokers"]


@pytest.fixture(scope="session")
def bouncer(pgflow_server: TestDatabases) -> Iterator[PgBouncer]:
    """A pgbouncer in transaction mode in front of the test server (tests/_pgbouncer.py).

    Skips when pgbouncer cannot run here, unless ``PGFLOW_TEST_PGBOUNCER=required``
    (``.ci/run`` sets it): then that is a failure.
    """
    with contextlib.ExitStack() as stack:
        try:
            running = stack.enter_context(pgbouncer(pgflow_server.server))
        except RuntimeError as exc:
            reason = f"pooled tests need a real pgbouncer: {exc}"
            if os.environ.get("PGFLOW_TEST_PGBOUNCER") == "required":
                pytest.fail(reason)
            pytest.skip(reason)
        yield running


@pytest.fixture
async def pool(pgflow_dsn: str) -> AsyncIterator[AsyncConnectionPool[AsyncConnection[Any]]]:
    p: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
        pgflow_dsn, min_size=1, max_size=8, open=False
    )
    await p.open(wait=True)
    try:
        yield p
    finally:
        await p.close()
