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


#: Seconds to wait for a server that does not answer, unless the DSN says otherwise
#: (libpq's default is to wait forever, and a black-holed host hangs for minutes).
DEFAULT_CONNECT_TIMEOUT = 10


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """Extra connection parameters pgflow adds to a DSN that does not set them."""
    return (
        {}
        if "connect_timeout" in conninfo_to_dict(dsn)
        else {"connect_timeout": DEFAULT_CONNECT_TIMEOUT}
    )


async def connect(dsn: str, *, autocommit: bool = False) -> AsyncConnection[Any]:
    """Open one connection, turning libpq failures into one-line pgflow errors.

    A bad option value (``port=abc``, ``sslmode=bogus``) is a :class:`ConfigError`;
    anything else (refused, unknown host, auth, no such database) is
    :class:`DatabaseUnavailable`.
    """
    validate_dsn(dsn)
    try:
        return await AsyncConnection.connect(dsn, autocommit=autocommit, **connect_kwargs(dsn))
    except psycopg.OperationalError as exc:
        message = first_line(exc)
        if message.startswith("connection is bad: invalid"):
            # libpq rejected an option before touching the network.
            reason = message.removeprefix("connection is bad: ")
            raise ConfigError(f"malformed DSN {redact(dsn)!r}: {reason}") from None
        raise DatabaseUnavailable(f"cannot connect to {redact(dsn)}: {message}") from None


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
        kwargs=connect_kwargs(dsn),
    )
    await pool.open(wait=True, timeout=30)
    return pool
