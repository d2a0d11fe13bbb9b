"""``pgflow inspect``: read-only SQL over pgflow's views, validated, then fenced.

Operators point this at production, often with a superuser DSN, and hand it to support
people, dashboards and AI agents. So a query passes several independent fences, and
one fence's miss is not a breach:

1. **Validation is an allow-list over the syntax tree** (sqlglot, PostgreSQL dialect):
   every node of the parsed statement must be of a kind learnt from the examples in
   ``ALLOWED_SYNTAX`` / ``ALLOWED_FUNCTIONS`` (anything sqlglot parses that is not in
   them is refused, whatever new syntax a sqlglot release learns). On top:

   * relations only from schema ``pgflow`` (unqualified names that are not a CTE in
     scope are qualified with ``pgflow.``); identifiers fold like PostgreSQL's (ASCII
     ``A``-``Z`` only: Python's ``str.lower()`` folds the Kelvin sign to ``k``, the
     server does not) and unquoted non-ASCII or over-long identifiers are refused;
   * PostgreSQL reads ``(x).f`` and ``a.f`` as the function call ``f(x)`` / ``f(a)``
     when ``f`` is not a column: field selection on an expression is refused, and
     ``a.f`` only passes when ``a`` is a relation of the FROM clause visible at that
     point (then ``f`` is its column, or one of the read-only functions that take any
     row, such as ``to_jsonb``) — for a function in FROM, whose "row" may be a plain
     value, only when ``f`` names one of its columns; schema-qualified functions are
     refused;
   * casts only to plain data types (no ``regclass``/``oid``/``xml``/user types: their
     input functions look up catalogs or parse documents);
   * no ``$1`` parameters, dollar-quoted, ``E''`` or ``U&''`` strings; ``lpad``/
     ``rpad`` lengths and ``format`` widths are small literals.
2. **What runs is what was validated**: the statement is re-generated from the checked
   tree (comments dropped) and must parse back to the same tree; the session sets
   ``standard_conforming_strings`` so string literals mean what sqlglot meant.
3. **A role that cannot do harm**: when the connecting role can ``SET ROLE
   pgflow_reader`` (superusers always can; others need ``GRANT pgflow_reader TO
   them``), the query runs as that NOLOGIN role, which ``pgflow migrate`` creates with
   USAGE on schema ``pgflow`` and SELECT on its views only. A validator miss is then a
   permission error, not a file read or a killed backend (advisory locks, ``pg_notify``
   and ``pg_sleep`` need no privilege: there the validator is the fence). A superuser
   connection never runs a query without that role.
4. **Execution** in a ``READ ONLY`` transaction that is always rolled back, with
   ``statement_timeout``, ``lock_timeout``, ``idle_in_transaction_session_timeout``,
   a small ``work_mem`` and (for superusers) ``temp_file_limit``, through a
   server-side cursor. Results are capped in rows and in bytes while fetching: the
   server keeps a running total of the bytes it sends and sends every row past the
   cap as NULLs, so the client never receives more than the cap.

Anything refused raises :class:`InspectRefused` with a one-line reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from pgflow import _db
from pgflow.ops._inspect_validate import (
    ALLOWED_FUNCTIONS,
    ALLOWED_SYNTAX,
    ALLOWED_TYPES,
    InspectError,
    InspectRefused,
    validate,
)

__all__ = [
    "ALLOWED_FUNCTIONS",
    "ALLOWED_SYNTAX",
    "ALLOWED_TYPES",
    "DEFAULT_LIMIT",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "READER_ROLE",
    "InspectError",
    "InspectFailed",
    "InspectRefused",
    "InspectResult",
    "inspect",
    "run_validated",
    "validate",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
DEFAULT_LIMIT = 1000
#: Default cap on the bytes of a result (PostgreSQL's text form of every row).
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: The NOLOGIN role ``pgflow migrate`` creates for inspect (see sql/zz_reader.sql).
READER_ROLE = "pgflow_reader"
#: Memory a sort or hash of the query may use before spilling (per node).
_WORK_MEM = "16MB"
#: Temporary files the query may write (only settable when connected as a superuser).
_TEMP_FILE_LIMIT = "256MB"


class InspectFailed(InspectError):
    """The server rejected or cancelled a validated query (bad column, timeout, ...)."""


@dataclass(frozen=True, slots=True)
class InspectResult:
    """Rows of a validated query; ``truncated`` when the row or byte cap cut it short.

    ``role`` is the role the query ran as: ``pgflow_reader``, or the connecting role
    when it cannot assume that one.
    """

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    sql: str
    role: str = ""
    bytes: int = 0


async def _assume_reader(conn: AsyncConnection[Any]) -> str:
    """``SET LOCAL ROLE pgflow_reader`` when allowed and safe; return the role in effect.

    Membership cannot be asked portably (PostgreSQL 16 adds a SET option to it), so the
    switch is tried under a savepoint. A reader role with more than NOLOGIN attributes
    (someone created it as a superuser, say) would be no fence, and one without USAGE
    on schema pgflow belongs to a database not migrated yet: neither is used.
    """
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s"
        " AND NOT (rolsuper OR rolcanlogin OR rolreplication OR rolbypassrls"
        " OR rolcreaterole OR rolcreatedb)"
        " AND pg_catalog.has_schema_privilege(oid, 'pgflow', 'USAGE'))",
        (READER_ROLE,),
    )
    row = await cur.fetchone()
    if row and row[0]:
        try:
            async with conn.transaction():
                await conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(READER_ROLE)))
            return READER_ROLE
        except psycopg.errors.InsufficientPrivilege:
            pass
    cur = await conn.execute(
        "SELECT current_user, pg_catalog.current_setting('is_superuser') = 'on'"
    )
    row = await cur.fetchone()
    role, superuser = (str(row[0]), bool(row[1])) if row else ("?", False)
    if superuser:
        # A superuser can always assume it, so it is missing or was altered: refuse
        # rather than run with every privilege behind the validator alone.
        raise InspectRefused(
            f"connected as superuser {role} but role {READER_ROLE} is missing, not granted"
            " schema pgflow here, or has more than NOLOGIN attributes: run `pgflow migrate`"
            " (it creates and grants the role)"
        )
    logger.debug("pgflow inspect runs as %s (cannot SET ROLE %s)", role, READER_ROLE)
    return role


async def _limit_resources(conn: AsyncConnection[Any], millis: int) -> None:
    await conn.execute("SET TRANSACTION READ ONLY")
    for name, value in (
        ("statement_timeout", f"{millis}ms"),
        ("lock_timeout", f"{millis}ms"),
        ("idle_in_transaction_session_timeout", f"{millis + 60_000}ms"),
        ("work_mem", _WORK_MEM),
        ("standard_conforming_strings", "on"),
        ("search_path", "pg_catalog, pgflow, pg_temp"),
        ("pgflow.inspect_used", "0"),  # the running byte total, see _capped
    ):
        await conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", (name, value))
    cur = await conn.execute("SELECT pg_catalog.current_setting('is_superuser') = 'on'")
    row = await cur.fetchone()
    if row and row[0]:
        await conn.execute(
            "SELECT pg_catalog.set_config('temp_file_limit', %s, true)", (_TEMP_FILE_LIMIT,)
        )


#: Rows per FETCH: the server's running byte total (see sql/zz_reader.sql) already
#: keeps every row past the cap from being sent, so batches need no smaller size.
_FETCH_ROWS = 200


def _capped(statement: str, width: int, max_bytes: int) -> str:
    """``statement`` wrapped so the server sends no row past ``max_bytes`` in total:
    its columns renamed positionally (names may repeat), NULLed once over the cap.

    The running total is computed in the target list of a subquery kept whole by
    ``OFFSET 0``, so it runs exactly once per row, in order, whatever the planner would
    otherwise pull up or fold (a constant row, for one, must still count every time).
    """
    cols = [f"c{i}" for i in range(width)]
    picks = "".join(f", CASE WHEN b.n >= 0 THEN b.{c} END" for c in cols)
    renamed = f"s({', '.join(cols)})" if cols else "s"  # `AS s()` is a syntax error
    return (
        f"SELECT b.n{picks} FROM (SELECT pgflow.inspect_row_budget("
        # ROW(s.*): the whole row, whatever its columns are called.
        f"pg_catalog.octet_length(ROW(s.*)::text), {int(max_bytes)}) AS n, s.*"
        f" FROM ({statement}) AS {renamed} OFFSET 0) AS b"
    )


async def run_validated(
    conn: AsyncConnection[Any],
    statement: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    limit: int = DEFAULT_LIMIT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> InspectResult:
    """Run an already :func:`validate`\\ d statement read-only on ``conn``.

    ``conn`` must not be in a transaction; the one opened here is always rolled back.
    The server counts the bytes of the rows it sends (PostgreSQL's text form) and
    sends the first row that would pass ``max_bytes``, and every later one, as NULLs:
    the client never receives more than ``max_bytes`` of values.
    """
    if timeout <= 0 or limit < 1 or max_bytes < 1:
        raise ValueError("timeout, limit and max_bytes must be positive")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        # Inside the caller's transaction the fences would be a savepoint's: refuse.
        raise ValueError("pgflow inspect needs a connection that is not in a transaction")
    millis = max(1, int(timeout * 1000))
    rows: list[tuple[Any, ...]] = []
    role = ""
    total = 0
    truncated = False
    try:
        async with conn.transaction(force_rollback=True):
            await _limit_resources(conn, millis)
            role = await _assume_reader(conn)
            # The shape first (no row is computed), to rename the columns positionally.
            cur = await conn.execute(f"SELECT * FROM ({statement}) AS s LIMIT 0")
            columns = [d.name for d in cur.description or ()]
            async with conn.cursor(name="pgflow_inspect") as named:
                await named.execute(_capped(statement, len(columns), max_bytes))
                while not truncated:
                    batch = await named.fetchmany(min(_FETCH_ROWS, limit + 1 - len(rows)))
                    if not batch:
                        break
                    for row in batch:
                        size = int(row[0])
                        if size < 0 and not rows:
                            raise InspectFailed(
                                f"the first row is {-size} bytes, over the {max_bytes}-byte"
                                " cap (--max-bytes)"
                            )
                        if size < 0 or len(rows) >= limit:
                            truncated = True
                            break
                        total += size
                        rows.append(tuple(row[1:]))
    except psycopg.errors.QueryCanceled:
        raise InspectFailed(
            f"query cancelled: it ran longer than the {timeout:g}s timeout (use --timeout)"
        ) from None
    except (psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.InsufficientPrivilege) as exc:
        hint = ""
        if role == READER_ROLE and isinstance(exc, psycopg.errors.InsufficientPrivilege):
            hint = f" ({READER_ROLE} reads pgflow's views only)"
        raise InspectRefused(f"refused by the server: {_db.first_line(exc)}{hint}") from None
    except psycopg.errors.UndefinedFunction as exc:
        if "inspect_row_budget" in str(exc):
            raise InspectFailed(
                "pgflow.inspect_row_budget() is missing: run `pgflow migrate`"
            ) from None
        raise InspectFailed(_db.first_line(exc)) from None
    except psycopg.Error as exc:
        raise InspectFailed(_db.first_line(exc)) from None
    return InspectResult(columns, rows, truncated, statement, role, total)


async def inspect(
    db: str | AsyncConnection[Any] | None,
    sql: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    limit: int = DEFAULT_LIMIT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> InspectResult:
    """Validate ``sql`` and run it read-only on ``db`` (a DSN, a connection, or None for
    ``PGFLOW_DATABASE_URL``). Raises :class:`InspectRefused` / :class:`InspectFailed`."""
    statement = validate(sql)
    kw: dict[str, Any] = {"timeout": timeout, "limit": limit, "max_bytes": max_bytes}
    if isinstance(db, AsyncConnection):
        return await run_validated(db, statement, **kw)
    conn = await _db.connect(_db.resolve_dsn(db))
    try:
        return await run_validated(conn, statement, **kw)
    finally:
        await conn.close()
