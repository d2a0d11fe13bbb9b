"""Shared fixtures: every test gets a fresh migrated database on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

pytest_plugins = ["pgflow.testing"]


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
