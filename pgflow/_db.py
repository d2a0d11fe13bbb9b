"""Connections: DSN resolution, clear connection errors, and the bounded pool.

Each pgflow process uses a fixed connection budget: one dedicated LISTEN connection
(see :mod:`pgflow.log.listener`) plus one bounded :class:`AsyncConnectionPool`.

Behind a connection pooler in transaction mode (pgbouncer ``pool_mode = transaction``,
RDS Proxy, Supavisor, PgCat) consecutive transactions of one client connection run on
different server sessions, so nothing may outlive a transaction. pgflow's own SQL is
written that way (transaction-scoped advisory locks, ``SET LOCAL``, ``ON COMMIT DROP``
temp tables, no ``WITH HOLD`` cursors); what remains is per connection and set here:
psycopg's server-side prepared statements (``prepare_threshold``) are switched off, and
LISTEN goes to a separate session DSN (``listen_dsn``) or is replaced by polling. It
cannot be detected soundly from the client (the pooler's ``SHOW`` commands live on its
admin console), so it is explicit: ``pooler=``, a ``pgflow_pooler=`` parameter in the
DSN (stripped before libpq sees it), or ``PGFLOW_POOLER``. (The listener does check the
property it needs: see :class:`pgflow.log.listener.Listener`.)
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from pgflow.errors import ConfigError, DatabaseUnavailable

logger = logging.getLogger(__name__)

DSN_ENV_VARS = ("PGFLOW_DATABASE_URL", "DATABASE_URL")
POOLER_ENV = "PGFLOW_POOLER"
LISTEN_DSN_ENV = "PGFLOW_LISTEN_DSN"

#: What sits between pgflow and PostgreSQL: nothing (or a session pooler, which behaves
#: like a direct connection), or a transaction pooler.
POOLERS = ("none", "session", "transaction")


#: pgflow's own DSN parameter: ``postgresql://…/app?pgflow_pooler=transaction`` or
#: ``host=… pgflow_pooler=transaction``; removed before the DSN reaches libpq (which
#: rejects parameters it does not know).
POOLER_PARAM = "pgflow_pooler"
_KV_POOLER = re.compile(r"(?:^|\s+)pgflow_pooler\s*=\s*(?:'([^']*)'|(\S*))")


def split_pooler(dsn: str) -> tuple[str, str | None]:
    """``dsn`` without a ``pgflow_pooler`` parameter, and that parameter's value.

    The rest of the DSN is kept byte for byte (a URL's other query parameters are not
    re-encoded: libpq does not read ``+`` as a space, for one).
    """
    if dsn.startswith(("postgresql://", "postgres://")):
        base, sep, query = dsn.partition("?")
        if not sep:
            return dsn, None
        kept, value = [], None
        for part in query.split("&"):
            key, _, raw = part.partition("=")
            if unquote(key) == POOLER_PARAM:
                value = unquote(raw)
            else:
                kept.append(part)
        if value is None:
            return dsn, None
        return (f"{base}?{'&'.join(kept)}" if kept else base), value
    match = _KV_POOLER.search(dsn)
    if match is None:
        return dsn, None
    value = match.group(1) if match.group(1) is not None else match.group(2)
    return (dsn[: match.start()] + dsn[match.end() :]).strip(), value


def libpq_dsn(dsn: str) -> str:
    """``dsn`` as libpq accepts it (pgflow's own parameters removed)."""
    return split_pooler(dsn)[0]


def resolve_pooler(pooler: str | None = None, dsn: str | None = None) -> str:
    """``pooler``, else the DSN's ``pgflow_pooler``, else ``$PGFLOW_POOLER``, else
    ``"none"``; validated.

    Statement pooling is refused: pgflow's guarantees rest on multi-statement
    transactions (batch + effects + cursor commit together).
    """
    source = "pooler"
    if pooler is None and dsn is not None:
        pooler = split_pooler(dsn)[1]
        source = f"{POOLER_PARAM} in the DSN"
    if pooler is None:
        pooler, source = os.environ.get(POOLER_ENV) or "none", POOLER_ENV
    mode = pooler.strip().lower()
    if mode == "statement":
        raise ConfigError(
            f"{source}=statement: pgflow needs multi-statement transactions; "
            "use pool_mode = transaction (or session)"
        )
    if mode not in POOLERS:
        raise ConfigError(f"{source} must be one of {', '.join(POOLERS)}, not {pooler!r}")
    return mode


def transaction_pooled(pooler: str | None = None, dsn: str | None = None) -> bool:
    """True when consecutive transactions may run on different server sessions."""
    return resolve_pooler(pooler, dsn) == "transaction"


def resolve_listen_dsn(dsn: str, listen_dsn: str | None, pooler: str | None) -> str | None:
    """The DSN of the dedicated LISTEN session, or None when there is none to use.

    ``listen_dsn`` (else ``$PGFLOW_LISTEN_DSN``) when given; else ``dsn`` itself unless
    it goes through a transaction pooler, where LISTEN cannot work (the session that
    listened is handed to another client after each transaction).
    """
    if listen_dsn is None:
        listen_dsn = os.environ.get(LISTEN_DSN_ENV) or None
    if listen_dsn is not None:
        validate_dsn(listen_dsn)
        return listen_dsn
    return None if transaction_pooled(pooler, dsn) else dsn


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
    """Raise :class:`ConfigError` when ``dsn`` is not a parseable libpq connection string
    (or has a bad ``pgflow_pooler``)."""
    libpq, pooler = split_pooler(dsn)
    if pooler is not None:
        resolve_pooler(None, dsn)
    try:
        conninfo_to_dict(libpq)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"malformed DSN {redact(dsn)!r}: {first_line(exc)}") from None


def redact(dsn: str) -> str:
    """The DSN with any password replaced, for error messages and logs."""
    try:
        params = conninfo_to_dict(libpq_dsn(dsn))
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


def connect_kwargs(dsn: str, pooler: str | None = None) -> dict[str, Any]:
    """Extra connection parameters pgflow adds: a connect timeout unless the DSN sets
    one, and no server-side prepared statements behind a transaction pooler (psycopg
    prepares a query after 5 runs; the next transaction may land on a session that
    never saw it: ``prepared statement "_pg3_1" does not exist``)."""
    kwargs: dict[str, Any] = {}
    if "connect_timeout" not in conninfo_to_dict(libpq_dsn(dsn)):
        kwargs["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
    if transaction_pooled(pooler, dsn):
        kwargs["prepare_threshold"] = None
    return kwargs


def check_pool(pool: Any, pooler: str | None = None) -> None:
    """Refuse a shared pool that would prepare statements behind a transaction pooler."""
    kwargs = getattr(pool, "kwargs", None) or {}
    if transaction_pooled(pooler) and kwargs.get("prepare_threshold", 5) is not None:
        raise ConfigError(
            "pooler=transaction but the given pool prepares statements: create it with "
            "kwargs={'prepare_threshold': None}"
        )


async def connect(
    dsn: str, *, autocommit: bool = False, pooler: str | None = None
) -> AsyncConnection[Any]:
    """Open one connection, turning libpq failures into one-line pgflow errors.

    A bad option value (``port=abc``, ``sslmode=bogus``) is a :class:`ConfigError`;
    anything else (refused, unknown host, auth, no such database) is
    :class:`DatabaseUnavailable`. ``pooler``: see :func:`resolve_pooler`.
    """
    validate_dsn(dsn)
    try:
        return await AsyncConnection.connect(
            libpq_dsn(dsn), autocommit=autocommit, **connect_kwargs(dsn, pooler)
        )
    except psycopg.OperationalError as exc:
        message = first_line(exc)
        if message.startswith("connection is bad: invalid"):
            # libpq rejected an option before touching the network.
            reason = message.removeprefix("connection is bad: ")
            raise ConfigError(f"malformed DSN {redact(dsn)!r}: {reason}") from None
        raise DatabaseUnavailable(f"cannot connect to {redact(dsn)}: {message}") from None


async def open_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 8,
    name: str = "pgflow",
    pooler: str | None = None,
    autocommit: bool = False,
) -> AsyncConnectionPool[AsyncConnection[Any]]:
    """Open a bounded pool after checking the server is reachable (fail fast, clearly)."""
    conn = await connect(dsn, pooler=pooler)
    await conn.close()
    kwargs = connect_kwargs(dsn, pooler)
    if autocommit:
        kwargs["autocommit"] = True
    pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
        libpq_dsn(dsn),
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name,
        kwargs=kwargs,
    )
    await pool.open(wait=True, timeout=30)
    return pool
