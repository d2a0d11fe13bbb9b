"""``pgflow inspect``: read-only SQL over pgflow's views and tables, validated first.

Operators point this at production, often with a powerful DSN, so the query is checked
before it reaches the server, and then run under several independent fences:

1. **Validation** (sqlglot, PostgreSQL dialect) — exactly one statement; a ``SELECT``
   (or a set operation of ``SELECT``\\ s; ``WITH`` only when every CTE is a query);
   nothing that writes, locks or changes settings anywhere in the tree (DML, DDL,
   ``COPY``, ``SET``, ``INTO``, ``FOR UPDATE/SHARE``...); relations only from schema
   ``pgflow`` (unqualified names that are not CTEs are qualified with ``pgflow.``, so
   ``pg_authid`` means ``pgflow.pg_authid`` and simply does not exist); functions only
   from an allow-list (aggregates, date/time, string, JSON helpers — never ``pg_sleep``,
   ``pg_read_file``, ``dblink``, ``lo_*``, ``set_config``, ``nextval``...).
2. **What runs is what was validated**: the statement is re-generated from the checked
   syntax tree, so a construct the parser might read differently from the server
   (quoting, comments) cannot smuggle anything past step 1.
3. **Execution** in a ``READ ONLY`` transaction that is always rolled back, with
   ``SET LOCAL statement_timeout`` (default 5 s) and ``lock_timeout``, through a
   server-side cursor that fetches at most ``limit`` rows.

Anything refused raises :class:`InspectRefused` with the reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlglot
from psycopg import AsyncConnection
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from . import _db
from .errors import PgflowError

__all__ = [
    "ALLOWED_FUNCTIONS",
    "DEFAULT_LIMIT",
    "DEFAULT_TIMEOUT",
    "InspectError",
    "InspectFailed",
    "InspectRefused",
    "InspectResult",
    "inspect",
    "run_validated",
    "validate",
]

SCHEMA = "pgflow"
DEFAULT_TIMEOUT = 5.0
DEFAULT_LIMIT = 1000


class InspectError(PgflowError):
    """Base class of ``pgflow inspect`` errors."""


class InspectRefused(InspectError):
    """The query is not a read-only query over pgflow's relations; nothing was run."""


class InspectFailed(InspectError):
    """The server rejected or cancelled a validated query (bad column, timeout, ...)."""


# --------------------------------------------------------------------- functions
#: PostgreSQL functions (and operators) a query may use. The checker learns which
#: sqlglot node each one parses to from these examples, so the list is written in
#: PostgreSQL terms and stays right when sqlglot renames its classes.
ALLOWED_FUNCTIONS = """
count(*), count(DISTINCT a), sum(a), avg(a), min(a), max(a), bool_and(a), bool_or(a),
every(a), array_agg(a), string_agg(a, ','), jsonb_agg(a), jsonb_object_agg(a, b),
json_agg(a), stddev(a), variance(a), percentile_cont(0.5) WITHIN GROUP (ORDER BY a),
percentile_disc(0.5) WITHIN GROUP (ORDER BY a), mode() WITHIN GROUP (ORDER BY a),
row_number() OVER (), rank() OVER (), dense_rank() OVER (), ntile(4) OVER (),
lag(a) OVER (), lead(a) OVER (), first_value(a) OVER (), last_value(a) OVER (),
coalesce(a, b), nullif(a, b), greatest(a, b), least(a, b),
now(), current_timestamp, current_date, clock_timestamp(), statement_timestamp(),
transaction_timestamp(), date_trunc('hour', a), extract(epoch FROM a),
date_part('day', a), age(a), age(a, b), to_timestamp(1), to_char(a, 'YYYY'),
to_date('2020', 'YYYY'), make_interval(secs => 3), justify_interval(a), isfinite(a),
lower(a), upper(a), length(a), char_length(a), initcap(a), left(a, 1), right(a, 1),
substr(a, 1, 2), substring(a FROM 1 FOR 2), position('a' IN b), strpos(a, b),
replace(a, 'x', 'y'), trim(a), ltrim(a), rtrim(a), btrim(a), lpad(a, 2), rpad(a, 2),
split_part(a, '-', 1), concat(a, b), concat_ws(',', a, b), format('%s', a),
regexp_replace(a, 'x', 'y'), regexp_match(a, 'x'), md5(a), starts_with(a, 'x'),
a ~ 'x', a ~* 'x', a !~ 'x', a !~* 'x', a LIKE 'x', a ILIKE 'x', a SIMILAR TO 'x', a || b,
a AND b, a OR b, NOT a, a ^ 2, a % 2, a / b,
abs(a), round(a, 2), round(a), ceil(a), floor(a), trunc(a), mod(a, b), power(a, 2),
sqrt(a), ln(a), log(a), exp(a), sign(a), random(),
cast(a AS text), a::int, a -> 'k', a ->> 'k', a #> '{a}', a #>> '{a}', a @> b, a <@ b,
a ? 'k', a ?| array['k'], a ?& array['k'], jsonb_typeof(a), jsonb_array_length(a),
jsonb_array_elements(a), jsonb_array_elements_text(a), jsonb_each(a),
jsonb_each_text(a), jsonb_object_keys(a), jsonb_extract_path(a, 'k'),
jsonb_extract_path_text(a, 'k'), jsonb_build_object('a', 1), jsonb_build_array(1),
jsonb_pretty(a), jsonb_strip_nulls(a), jsonb_path_query(a, '$.x'),
jsonb_path_query_first(a, '$.x'), jsonb_path_exists(a, '$.x'), to_jsonb(a),
json_build_object('a', 1), row_to_json(a), to_json(a),
array_length(a, 1), cardinality(a), unnest(a), array_position(a, b),
array_to_string(a, ','), string_to_array(a, ','), generate_series(1, 2),
a = ANY(b), a IN (1), EXISTS (SELECT 1), a IS DISTINCT FROM b, a BETWEEN 1 AND 2,
CASE WHEN a THEN 1 END, a AT TIME ZONE 'UTC', a[1], array[1, 2],
gen_random_uuid(), encode(a, 'hex'), pg_snapshot_xmin(a),
pg_current_snapshot()
"""

#: Never allowed, whatever the list above says (documented refusals; also a backstop).
DENIED_FUNCTIONS = frozenset(
    {
        "pg_sleep", "pg_sleep_for", "pg_sleep_until", "pg_read_file", "pg_read_binary_file",
        "pg_ls_dir", "pg_stat_file", "pg_terminate_backend", "pg_cancel_backend",
        "pg_reload_conf", "pg_rotate_logfile", "pg_advisory_lock", "pg_advisory_xact_lock",
        "pg_try_advisory_lock", "pg_notify", "set_config", "current_setting", "dblink",
        "dblink_exec", "dblink_connect", "lo_import", "lo_export", "lo_get", "lo_put",
        "lo_open", "lo_creat", "lo_create", "lo_unlink", "nextval", "setval", "currval",
        "txid_current", "pg_current_xact_id", "query_to_xml", "query_to_xmlschema",
        "table_to_xml", "cursor_to_xml", "pg_logical_emit_message", "pg_switch_wal",
        "pg_create_restore_point", "pg_file_write", "copy",
    }
)  # fmt: skip


@functools.cache
def _allowed() -> tuple[frozenset[type[Any]], frozenset[str]]:
    """(sqlglot classes, anonymous function names) the allow-list parses to."""
    probe = sqlglot.parse_one(f"SELECT {ALLOWED_FUNCTIONS}", read="postgres")
    classes: set[type[Any]] = set()
    names: set[str] = set()
    for node in probe.find_all(exp.Func):
        if isinstance(node, exp.Anonymous):
            names.add(str(node.name).lower())
        else:
            classes.add(type(node))
    return frozenset(classes), frozenset(names - DENIED_FUNCTIONS)


def _function_name(node: exp.Func) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    return node.sql_name().lower()


# ---------------------------------------------------------------- statement kinds
def _classes(*names: str) -> tuple[type[Any], ...]:
    found = [getattr(exp, n) for n in names if isinstance(getattr(exp, n, None), type)]
    return tuple(found)


#: Nodes that write, lock, change state or escape the parser; refused anywhere.
_FORBIDDEN_NODES: tuple[tuple[tuple[type[Any], ...], str], ...] = (
    (_classes("Insert"), "INSERT"),
    (_classes("Update"), "UPDATE"),
    (_classes("Delete"), "DELETE"),
    (_classes("Merge"), "MERGE"),
    (_classes("TruncateTable"), "TRUNCATE"),
    (_classes("Create"), "CREATE"),
    (_classes("Drop"), "DROP"),
    (_classes("Alter", "AlterTable", "AlterColumn", "RenameTable"), "ALTER"),
    (_classes("Copy"), "COPY"),
    (_classes("Set", "SetItem"), "SET"),
    (_classes("Lock"), "locking clause (FOR UPDATE/SHARE)"),
    (_classes("Into"), "SELECT ... INTO"),
    (_classes("Transaction", "Commit", "Rollback"), "transaction control"),
    (_classes("Grant", "Revoke"), "GRANT/REVOKE"),
    (_classes("Command"), "command"),
    (_classes("Use", "Pragma", "Analyze", "Describe", "LoadData", "Cache", "Uncache"), "command"),
)


#: Read-only query shapes: SELECT, UNION/INTERSECT/EXCEPT of them, a parenthesised query.
_QUERY_TYPES: tuple[type[Any], ...] = _classes("Select", "SetOperation", "Union", "Subquery")


@dataclass(frozen=True, slots=True)
class InspectResult:
    """Rows of a validated query; ``truncated`` when more than ``limit`` rows existed."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    sql: str


def _normalize(ident: exp.Identifier | None) -> str | None:
    """An identifier as PostgreSQL folds it: unquoted lowercased, quoted verbatim."""
    if ident is None:
        return None
    name = str(ident.this)
    return name if ident.args.get("quoted") else name.lower()


def _table_name(table: exp.Table) -> str | None:
    ident = table.this
    return _normalize(ident) if isinstance(ident, exp.Identifier) else None


def _cte_visible(table: Any, name: str) -> bool:
    """Whether unqualified ``name`` at ``table`` refers to a CTE in scope (PG rules:
    a WITH's CTEs are visible in its query and in later CTEs of the same WITH; with
    RECURSIVE, in all of them)."""
    child: Any = table
    parent = table.parent
    while parent is not None:
        with_ = parent.args.get("with_") or parent.args.get("with")
        if isinstance(with_, exp.With):
            ctes = [c for c in with_.expressions if isinstance(c, exp.CTE)]
            recursive = bool(with_.args.get("recursive"))
            if child is with_:
                # We came up through one of this WITH's CTE bodies.
                idx = _path_index(table, ctes)
                visible = ctes if recursive else ctes[: max(idx, 0)]
            else:
                visible = ctes
            if any(_normalize(_cte_ident(c)) == name for c in visible):
                return True
        child, parent = parent, parent.parent
    return False


def _cte_ident(cte: exp.CTE) -> exp.Identifier | None:
    alias = cte.args.get("alias")
    if isinstance(alias, exp.TableAlias) and isinstance(alias.this, exp.Identifier):
        return alias.this
    return None


def _path_index(node: Any, ctes: Sequence[exp.CTE]) -> int:
    """Index of the CTE (in ``ctes``) whose body contains ``node``; -1 if none."""
    cur: Any = node
    while cur is not None:
        for i, cte in enumerate(ctes):
            if cur is cte:
                return i
        cur = cur.parent
    return -1


def validate(sql: str) -> str:
    """Check ``sql`` and return the statement to run (qualified, re-generated).

    Raises :class:`InspectRefused` naming the first problem found.
    """
    if not sql or not sql.strip():
        raise InspectRefused("empty query")
    # sqlglot logs a warning when it falls back to an opaque Command (EXPLAIN, DO...);
    # those are refused below with a clearer message, so keep the terminal quiet.
    sqlglot_logger = logging.getLogger("sqlglot")
    level = sqlglot_logger.level
    sqlglot_logger.setLevel(logging.ERROR)
    try:
        statements = [s for s in sqlglot.parse(sql, read="postgres") if s is not None]
    except (ParseError, TokenError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
        raise InspectRefused(f"cannot parse the query: {first}") from None
    finally:
        sqlglot_logger.setLevel(level)
    if not statements:
        raise InspectRefused("empty query")
    if len(statements) > 1:
        raise InspectRefused(f"exactly one statement allowed, got {len(statements)}")
    stmt = statements[0]
    for classes, label in _FORBIDDEN_NODES:
        if classes and (stmt.find(*classes) is not None or isinstance(stmt, classes)):
            kind = label if label != "command" else _command_word(stmt)
            raise InspectRefused(f"only read-only SELECT queries are allowed ({kind} found)")
    if not isinstance(stmt, _QUERY_TYPES):
        raise InspectRefused(f"only SELECT queries are allowed, got {stmt.key.upper()}")
    for with_ in stmt.find_all(exp.With):
        for cte in with_.expressions:
            body = cte.this if isinstance(cte, exp.CTE) else cte
            if not isinstance(body, _QUERY_TYPES):
                raise InspectRefused("every WITH query must be a SELECT")

    allowed_classes, names = _allowed()
    for func in stmt.find_all(exp.Func):
        name = _function_name(func)
        if name in DENIED_FUNCTIONS:
            raise InspectRefused(f"function {name}() is not allowed in pgflow inspect")
        if isinstance(func, exp.Anonymous):
            if name not in names:
                raise InspectRefused(f"function {name}() is not allowed in pgflow inspect")
        elif type(func) not in allowed_classes:
            raise InspectRefused(f"function {name}() is not allowed in pgflow inspect")

    for table in list(stmt.find_all(exp.Table)):
        table_name = _table_name(table)
        if table_name is None:
            continue  # a table function (checked above) or a subquery
        if table.args.get("catalog") is not None:
            raise InspectRefused(f"cross-database reference {table.sql('postgres')} refused")
        schema = table.args.get("db")
        if schema is not None:
            schema_name = _normalize(schema) if isinstance(schema, exp.Identifier) else None
            if schema_name != SCHEMA:
                raise InspectRefused(
                    f"only relations in schema {SCHEMA} may be read, not {table.sql('postgres')}"
                )
            continue
        if _cte_visible(table, table_name):
            continue
        table.set("db", exp.to_identifier(SCHEMA))
    return str(stmt.sql(dialect="postgres"))


def _command_word(stmt: Any) -> str:
    cmd = stmt if isinstance(stmt, exp.Command) else stmt.find(exp.Command)
    if cmd is not None and cmd.this:
        return str(cmd.this).split()[0].upper()
    return str(stmt.key).upper()


async def run_validated(
    conn: AsyncConnection[Any],
    statement: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    limit: int = DEFAULT_LIMIT,
) -> InspectResult:
    """Run an already :func:`validate`\\ d statement read-only on ``conn``.

    ``conn`` must not be in a transaction; the one opened here is always rolled back.
    """
    if timeout <= 0 or limit < 1:
        raise ValueError("timeout and limit must be positive")
    millis = max(1, int(timeout * 1000))
    try:
        async with conn.transaction(force_rollback=True):
            await conn.execute("SET TRANSACTION READ ONLY")
            await conn.execute(f"SET LOCAL statement_timeout = {millis}")
            await conn.execute(f"SET LOCAL lock_timeout = {millis}")
            await conn.execute("SET LOCAL search_path = pgflow")
            async with conn.cursor(name="pgflow_inspect") as cur:
                await cur.execute(statement)
                rows = await cur.fetchmany(limit + 1)
                columns = [d.name for d in cur.description or ()]
    except psycopg.errors.QueryCanceled:
        raise InspectFailed(
            f"query cancelled: it ran longer than the {timeout:g}s timeout (use --timeout)"
        ) from None
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        raise InspectRefused(f"refused by the server: {_db.first_line(exc)}") from None
    except psycopg.Error as exc:
        raise InspectFailed(_db.first_line(exc)) from None
    truncated = len(rows) > limit
    return InspectResult(columns, [tuple(r) for r in rows[:limit]], truncated, statement)


async def inspect(
    db: str | AsyncConnection[Any] | None,
    sql: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    limit: int = DEFAULT_LIMIT,
) -> InspectResult:
    """Validate ``sql`` and run it read-only on ``db`` (a DSN, a connection, or None for
    ``PGFLOW_DATABASE_URL``). Raises :class:`InspectRefused` / :class:`InspectFailed`."""
    statement = validate(sql)
    if isinstance(db, AsyncConnection):
        return await run_validated(db, statement, timeout=timeout, limit=limit)
    conn = await _db.connect(_db.resolve_dsn(db))
    try:
        return await run_validated(conn, statement, timeout=timeout, limit=limit)
    finally:
        await conn.close()
