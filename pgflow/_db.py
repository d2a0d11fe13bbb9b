"""Connections: DSN resolution, clear connection errors, and the bounded pool.

Each pgflow process uses a fixed connection budget: one dedicated LISTEN connection
(see :mod:`pgflow.streamer`) plus one bounded :class:`AsyncConnectionPool`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from .errors import ConfigError, DatabaseUnavailable

logger = logging.getLogger("pgflow.db")

DSN_ENV_VARS = ("PGFLOW_DATABASE_URL", "DATABASE_URL")


def resolve_dsn(dsn: str | None = None) -> str:
    """Return ``dsn`` or the first of ``PGFLOW_DATABASE_URL``/``DATABASE_URL`` that is set.

    The DSN is parsed here so a typo fails at once with a clear message instead of deep
    inside a pool's background reconnect loop.
    """
    if dsn is None:
        for var in DSN_ENV_VARS:
            if os.environ.get(var):
                dsn = os.environ[var]
                break
    if not dsn:
        raise ConfigError(
            "no database given: pass --dsn/dsn= or set PGFLOW_DATABASE_URL "
            "(e.g. postgresql://user@localhost:5432/app)"
        )
    validate_dsn(dsn)
    return dsn


def validate_dsn(dsn: str) -> None:
    """Raise :class:`ConfigError` when ``dsn`` is not a parseable libpq connection string."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"malformed DSN {redact(dsn)!r}: {first_line(exc)}") from None


def redact(dsn: str) -> str:
    """The DSN with any password replaced, for error messages and logs."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return dsn.split("@")[-1] if "@" in dsn else dsn
    if "password" in params:
        params["password"] = "***"
    return " ".join(f"{k}={v}" for k, v in params.items())


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def connect(dsn: str, *, autocommit: bool = False) -> AsyncConnection[Any]:
    """Open one connection, turning libpq failures into :class:`DatabaseUnavailable`."""
    validate_dsn(dsn)
    try:
        return await AsyncConnection.connect(dsn, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact(dsn)}: {first_line(exc)}") from None


async def open_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 8, name: str = "pgflow"
) -> AsyncConnectionPool[AsyncConnection[Any]]:
    """Open a bounded pool after checking the server is reachable (fail fast, clearly)."""
    conn = await connect(dsn)
    await conn.close()
    pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name,
    )
    await pool.open(wait=True, timeout=30)
    return pool
