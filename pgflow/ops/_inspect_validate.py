"""Validation of ``pgflow inspect`` queries: an allow-list over sqlglot's syntax tree.

See :mod:`pgflow.ops.inspect` for the fences around it. The rule of this module: a node
kind, function, cast type or name form is accepted only because it is listed here
(learnt from example SQL written in PostgreSQL terms); everything else is refused
with a one-line reason naming what was found. Where PostgreSQL and sqlglot could read
a construct differently, the construct is refused rather than interpreted.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from pgflow.errors import PgflowError

__all__ = [
    "ALLOWED_FUNCTIONS",
    "ALLOWED_SYNTAX",
    "ALLOWED_TYPES",
    "InspectError",
    "InspectRefused",
    "MAX_PAD",
    "validate",
]

SCHEMA = "pgflow"
#: Largest ``lpad``/``rpad`` length and ``format`` width: bigger ones turn a short query
#: into a huge value (``format('%2000000000s', 'x')`` is 2 GB on the server).
MAX_PAD = 10_000
#: Longest query text accepted (bounds nesting and constant sizes).
MAX_QUERY_CHARS = 100_000
#: PostgreSQL truncates identifiers to 63 bytes; longer ones could alias each other there.
MAX_IDENTIFIER_BYTES = 63


class InspectError(PgflowError):
    """Base class of ``pgflow inspect`` errors."""

    __module__ = "pgflow.inspect"  # where users import it from


class InspectRefused(InspectError):
    """The query is not a read-only query over pgflow's relations; nothing was run."""

    __module__ = "pgflow.inspect"


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
cast(a AS text), a::int, a -> 'k', a ->> 'k', a -> 0, a ->> 1, a -> b, a ->> b,
a #> '{a}', a #>> '{a}', a #>> '{a,b}', a @> b, a <@ b,
a ? 'k', a ?| array['k'], a ?& array['k'], jsonb_typeof(a), jsonb_array_length(a),
jsonb_array_elements(a), jsonb_array_elements_text(a), jsonb_each(a),
jsonb_each_text(a), jsonb_object_keys(a), jsonb_extract_path(a, 'k'),
jsonb_extract_path_text(a, 'k'), jsonb_build_object('a', 1), jsonb_build_array(1),
jsonb_pretty(a), jsonb_strip_nulls(a), jsonb_path_query(a, '$.x'),
jsonb_path_query_first(a, '$.x'), jsonb_path_exists(a, '$.x'), to_jsonb(a),
json_build_object('a', 1), row_to_json(a), to_json(a),
array_length(a, 1), cardinality(a), unnest(a), array_position(a, b),
array_to_string(a, ','), string_to_array(a, ','), generate_series(1, 2),
a = ANY(b), a = ALL(b), a IN (1), EXISTS (SELECT 1), a IS DISTINCT FROM b, a BETWEEN 1 AND 2,
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


#: Query shapes a query may use (every node kind these parse to is allowed; the
#: special kinds — columns, tables, casts, functions — get their own checks below).
ALLOWED_SYNTAX = """
SELECT DISTINCT a AS b, t.*, * FROM t AS x(c) JOIN u ON a = b LEFT JOIN v USING (c)
  CROSS JOIN w RIGHT JOIN y ON true FULL JOIN z ON false
WHERE NOT a AND b OR c GROUP BY a, ROLLUP (a), CUBE (b), GROUPING SETS ((a), ())
HAVING count(*) > 1 WINDOW wn AS (ORDER BY a) ORDER BY a DESC NULLS LAST LIMIT 1 OFFSET 2;
WITH RECURSIVE c AS MATERIALIZED (SELECT 1), d AS NOT MATERIALIZED (SELECT 2)
  SELECT * FROM c UNION ALL SELECT 1 UNION SELECT 3 INTERSECT SELECT 2 EXCEPT SELECT 3;
SELECT DISTINCT ON (a) a FROM (SELECT 1) AS s, LATERAL (SELECT 1) AS l,
  (VALUES (1, 2)) AS v(a, b), unnest(a) WITH ORDINALITY AS u(x, n) FETCH FIRST 3 ROWS ONLY;
VALUES (1, 'a'), (2, 'b');
SELECT a <> b, a != b, a < b, a <= b, a > b, a >= b, a IS NULL, a IS NOT NULL, a IS TRUE,
  a NOT IN (1), a NOT LIKE 'x', -a, +a, a + b, a - b, a * b, a IN (SELECT 1),
  a IS NOT DISTINCT FROM b, count(*) FILTER (WHERE a), a[1:2], 'a' COLLATE "C",
  sum(a) OVER (PARTITION BY b ORDER BY c ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
  sum(a) OVER wn, interval '1 day', TRUE, FALSE, NULL, 1.5, 'x', (a), (1, 2), current_user,
  (SELECT 1), CASE a WHEN 1 THEN 2 ELSE 3 END, NOT EXISTS (SELECT 1), a::text[],
  x::varchar(3)
"""

#: Types a value may be cast to. Not ``regclass``/``regproc``/... (their input functions
#: look names up in the catalogs: ``'pg_authid'::regclass::oid``), not ``xml`` (a
#: document parser), not ``oid``, not user-defined types.
ALLOWED_TYPES = frozenset(
    {
        "TEXT", "VARCHAR", "CHAR", "NCHAR", "NVARCHAR", "BPCHAR", "NAME", "BOOLEAN",
        "SMALLINT", "INT", "BIGINT", "DECIMAL", "FLOAT", "DOUBLE", "DATE", "TIME",
        "TIMETZ", "TIMESTAMP", "TIMESTAMPTZ", "INTERVAL", "JSON", "JSONB", "UUID",
        "ARRAY", "BIGDECIMAL",
    }
)  # fmt: skip

#: Names PostgreSQL gives to system columns; refused so a query over a table cannot
#: reach ``tableoid`` or physical row addresses (``xmin`` is also a column of the
#: ``horizon`` view, and harmless).
SYSTEM_COLUMNS = frozenset({"ctid", "tableoid", "xmax", "cmin", "cmax", "oid"})

#: Friendlier names for node kinds people actually try.
_KIND_NAMES = {
    "parameter": "query parameters ($1)",
    "rawstring": "dollar-quoted strings",
    "bytestring": "E'' strings",
    "unicodestring": "U&'' strings",
    "bitwiseand": 'the & operator (or U&"" identifiers)',
    "placeholder": "placeholders",
    "lock": "locking clause (FOR UPDATE/SHARE)",
    "into": "SELECT ... INTO",
    "command": "commands",
}


def _classes(*names: str) -> tuple[type[Any], ...]:
    found = [getattr(exp, n) for n in names if isinstance(getattr(exp, n, None), type)]
    return tuple(found)


#: Statements that write, lock or change state: named in the refusal.
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

#: Read-only query shapes a statement (and every CTE) may have.
_QUERY_TYPES: tuple[type[Any], ...] = _classes(
    "Select", "SetOperation", "Union", "Subquery", "Values"
)

#: Node kinds with their own check (never allowed just for appearing in an example).
_SPECIAL: tuple[type[Any], ...] = (
    exp.Column,
    exp.Table,
    exp.Cast,
    exp.DataType,
    exp.DataTypeParam,
    exp.Dot,
    exp.Identifier,
    exp.Func,
    exp.Lambda,
)


@functools.cache
def _allowed() -> tuple[frozenset[type[Any]], frozenset[type[Any]], frozenset[str]]:
    """(plain node kinds, function classes, anonymous function names) from the lists."""
    funcs = sqlglot.parse_one(f"SELECT {ALLOWED_FUNCTIONS}", read="postgres")
    shapes = sqlglot.parse(ALLOWED_SYNTAX, read="postgres")
    kinds: set[type[Any]] = set()
    classes: set[type[Any]] = set()
    names: set[str] = set()
    for tree in [funcs, *(s for s in shapes if s is not None)]:
        for node in tree.walk():
            if isinstance(node, exp.Anonymous):
                names.add(_fold(str(node.name), quoted=False))
            elif isinstance(node, exp.Func) and not isinstance(node, exp.Cast):
                classes.add(type(node))  # also structural ones: If (CASE), Unnest, ...
            elif not isinstance(node, _SPECIAL):
                kinds.add(type(node))
    return frozenset(kinds), frozenset(classes), frozenset(names - DENIED_FUNCTIONS)


# ------------------------------------------------------------------- identifiers
def _fold(name: str, *, quoted: bool) -> str:
    """An identifier as PostgreSQL folds it: quoted verbatim, unquoted ASCII A-Z lowered
    (and nothing else: the server leaves U+212A KELVIN SIGN alone, Python would not)."""
    if quoted:
        return name
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _normalize(ident: Any) -> str | None:
    if not isinstance(ident, exp.Identifier):
        return None
    return _fold(str(ident.this), quoted=bool(ident.args.get("quoted")))


def _check_identifier(ident: exp.Identifier) -> None:
    name = str(ident.this)
    if "\x00" in name:
        raise InspectRefused("NUL character in an identifier")
    if not ident.args.get("quoted") and not name.isascii():
        raise InspectRefused(f"non-ASCII unquoted identifier {name!r} (quote it)")
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise InspectRefused(f"identifier longer than {MAX_IDENTIFIER_BYTES} bytes: {name[:20]}...")


# ------------------------------------------------------------------------ scopes
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
                idx = _path_index(table, ctes)
                visible = ctes if recursive else ctes[: max(idx, 0)]
            else:
                visible = ctes
            if any(_normalize(_alias_ident(c)) == name for c in visible):
                return True
        child, parent = parent, parent.parent
    return False


def _alias_ident(node: Any) -> exp.Identifier | None:
    alias = node.args.get("alias")
    if isinstance(alias, exp.TableAlias) and isinstance(alias.this, exp.Identifier):
        return alias.this
    return None


def _path_index(node: Any, items: Sequence[Any]) -> int:
    """Index of the item of ``items`` that is ``node`` or contains it; -1 if none."""
    cur: Any = node
    while cur is not None:
        for i, item in enumerate(items):
            if cur is item:
                return i
        cur = cur.parent
    return -1


#: Columns a FROM item is known to have: None for a relation-like item (table, view,
#: subquery, VALUES, CTE), whose whole-row value is a composite, so ``a.f`` is a column
#: or a function of a row; a set for a function, whose whole-row value may be a plain
#: scalar: ``g.pg_advisory_lock FROM generate_series(1, 1) g`` calls
#: ``pg_advisory_lock(g)``. So only these names may follow a function's alias.
Columns = frozenset[str] | None

#: Column names of the allow-listed set-returning functions (jsonb_each: key, value;
#: jsonb_array_elements: value; WITH ORDINALITY: ordinality). No function of these
#: names exists in pg_catalog, so even where one is not a column it calls nothing.
_FUNCTION_COLUMNS = frozenset({"key", "value", "ordinality"})


def _item_name(item: Any) -> tuple[str, Columns] | None:
    """The name a FROM item is referred to by (its alias; else a table's or a table
    function's name) and its known columns; None for what this check does not model
    (nested join trees, subqueries without an alias)."""
    func = _is_function_item(item)
    alias = item.args.get("alias")
    name = _normalize(_alias_ident(item))
    if name is None and isinstance(item, exp.Table) and isinstance(item.this, exp.Identifier):
        name = _normalize(item.this)
    if name is None and isinstance(item, exp.Table) and isinstance(item.this, exp.Anonymous):
        name = _fold(str(item.this.name), quoted=False)
    if name is None:
        return None
    if not func:
        return name, None
    declared = alias.args.get("columns") if isinstance(alias, exp.TableAlias) else None
    if declared:
        return name, frozenset(n for n in map(_normalize, declared) if n) | {"ordinality"}
    return name, _FUNCTION_COLUMNS | {name}


def _is_function_item(item: Any) -> bool:
    if isinstance(item, exp.Unnest):
        return True
    if isinstance(item, (exp.Table, exp.Lateral)):
        return isinstance(item.this, exp.Func)
    return False


def _is_lateral(item: Any) -> bool:
    """LATERAL items, and functions in FROM (implicitly lateral in PostgreSQL)."""
    return isinstance(item, exp.Lateral) or _is_function_item(item)


def _explicit(join: exp.Join) -> bool:
    """``JOIN ... ON/USING``, ``CROSS``/``NATURAL JOIN``: not a comma."""
    return any(join.args.get(k) for k in ("on", "using", "kind", "side", "method"))


def _named(items: Sequence[Any]) -> dict[str, Columns]:
    return dict(n for n in map(_item_name, items) if n is not None)


def _visible_relations(column: exp.Column) -> dict[str, Columns]:
    """Names of the FROM items PostgreSQL lets ``column`` qualify with, at its place.

    Errs on the side of fewer names: a name missing here is a refusal the user can
    work around; a name here that the server does not see would let ``a.f`` become
    the function call ``f(a)``.
    """
    names: dict[str, Columns] = {}
    path: list[Any] = [column]
    node: Any = column.parent
    while node is not None:
        if isinstance(node, exp.Select):
            via = path[-1]
            from_ = node.args.get("from_") or node.args.get("from")
            joins = list(node.args.get("joins") or [])
            items = ([from_.this] if isinstance(from_, exp.From) else []) + [j.this for j in joins]
            if isinstance(via, exp.From):
                pass  # the first FROM item sees nothing of its own level
            elif isinstance(via, exp.Join):
                k = next(i for i, j in enumerate(joins) if j is via)
                inside = path[-2] if len(path) > 1 else None
                if inside is via.this:
                    if _is_lateral(via.this):
                        names = _named(items[: k + 1]) | names
                else:  # the ON / USING condition: this join's tree, back to a comma
                    start = 0
                    for m in range(k, -1, -1):
                        if not _explicit(joins[m]):
                            start = m + 1
                            break
                    names = _named(items[start : k + 2]) | names
            elif via is node.args.get("with_") or via is node.args.get("with"):
                break  # a CTE body sees no FROM item outside it
            else:  # select list, WHERE, GROUP BY, HAVING, ORDER BY, windows...
                names = _named(items) | names  # inner levels shadow outer ones
        path.append(node)
        node = node.parent
    return names


# ------------------------------------------------------------------------ checks
def _refuse_kind(node: Any) -> InspectRefused:
    kind = str(node.key)
    label = _KIND_NAMES.get(kind) or f"{kind.upper()} ({_snippet(node)})"
    return InspectRefused(f"{label} is not allowed in pgflow inspect")


def _snippet(node: Any) -> str:
    text = " ".join(str(node.sql(dialect="postgres", comments=False)).split())
    return text if len(text) <= 40 else text[:37] + "..."


def _check_column(col: exp.Column) -> None:
    parts = [p for p in (col.args.get(k) for k in ("catalog", "db", "table")) if p is not None]
    name = col.this
    if isinstance(name, exp.Identifier) and _normalize(name) in SYSTEM_COLUMNS:
        raise InspectRefused(f"system column {name.this} is not allowed in pgflow inspect")
    if not parts:
        return
    if len(parts) > 1:
        raise InspectRefused(f"{_snippet(col)}: use at most one qualifier (table alias) per column")
    qualifier = _normalize(parts[0])
    visible = _visible_relations(col)
    if qualifier is None or qualifier not in visible:
        raise InspectRefused(
            f"{_snippet(col)}: {parts[0].sql()} is not a table of the FROM clause here"
            " (PostgreSQL would read it as a function call on a column)"
        )
    columns = visible[qualifier]
    if columns is not None and isinstance(name, exp.Identifier) and _normalize(name) not in columns:
        raise InspectRefused(
            f"{_snippet(col)}: {name.sql()} is not a column of the function {parts[0].sql()}"
            " (PostgreSQL would read it as a function call); name the columns: AS x(a, b)"
        )


def _check_dot(dot: exp.Dot) -> None:
    target = dot.expression
    if isinstance(target, exp.Func):
        raise InspectRefused(
            f"schema-qualified function {_snippet(dot)} is not allowed (write it unqualified)"
        )
    raise InspectRefused(
        f"{_snippet(dot)}: field selection (x).f is not allowed (PostgreSQL reads it as the"
        " function call f(x)); use -> / ->> for JSON"
    )


def _check_cast(cast: exp.Cast) -> None:
    to = cast.args.get("to")
    if not isinstance(to, exp.DataType):
        raise InspectRefused(f"cast to {_snippet(to) if to else '?'} is not allowed")
    for dt in to.find_all(exp.DataType):
        type_name = str(dt.this.name if hasattr(dt.this, "name") else dt.this)
        if type_name not in ALLOWED_TYPES or dt.args.get("kind") is not None:
            raise InspectRefused(f"cast to {_snippet(to)} is not allowed in pgflow inspect")


_FORMAT_SPEC = re.compile(r"%(?:\d+\$)?(-*)(\*(?:\d+\$)?|\d+)?([a-zA-Z%]?)")


def _check_function(func: exp.Func, classes: frozenset[type[Any]], names: frozenset[str]) -> None:
    if isinstance(func, exp.Anonymous):
        ident = func.this
        if isinstance(ident, exp.Identifier) and ident.args.get("quoted"):
            raise InspectRefused(f"quoted function name {ident.sql()} is not allowed")
        name = _fold(str(func.name), quoted=False)
        if name in DENIED_FUNCTIONS or name not in names:
            raise InspectRefused(f"function {name}() is not allowed in pgflow inspect")
        return
    name = func.sql_name().lower()
    if name in DENIED_FUNCTIONS or type(func) not in classes:
        raise InspectRefused(f"function {name}() is not allowed in pgflow inspect")
    if isinstance(func, exp.Pad):
        length = func.args.get("expression")
        if not (
            isinstance(length, exp.Literal)
            and not length.is_string
            and str(length.this).isdigit()
            and int(str(length.this)) <= MAX_PAD
        ):
            raise InspectRefused(f"{name}() length must be a number up to {MAX_PAD}")
    if isinstance(func, exp.Format):
        pattern = func.this
        if not (isinstance(pattern, exp.Literal) and pattern.is_string):
            raise InspectRefused("format() needs a literal format string")
        for match in _FORMAT_SPEC.finditer(str(pattern.this)):
            width = match.group(2) or ""
            if width.startswith("*") or (width and int(width) > MAX_PAD):
                raise InspectRefused(f"format() widths must be literal numbers up to {MAX_PAD}")


def _check_table(table: exp.Table) -> None:
    """Relations only from schema pgflow: unqualified non-CTE names get ``pgflow.``."""
    if table.args.get("catalog") is not None:
        raise InspectRefused(f"cross-database reference {_snippet(table)} refused")
    schema = table.args.get("db")
    if not isinstance(table.this, exp.Identifier):  # a function in FROM
        if schema is not None:
            raise InspectRefused(
                f"schema-qualified function {_snippet(table)} is not allowed (write it unqualified)"
            )
        return
    if schema is not None:
        if _normalize(schema) != SCHEMA:
            raise InspectRefused(
                f"only relations in schema {SCHEMA} may be read, not {_snippet(table)}"
            )
        return
    name = _normalize(table.this)
    if name is not None and _cte_visible(table, name):
        return
    table.set("db", exp.to_identifier(SCHEMA))


def _parse(sql: str) -> list[Any]:
    # sqlglot logs a warning when it falls back to an opaque Command (EXPLAIN, DO...);
    # those are refused with a clearer message, so keep the terminal quiet.
    sqlglot_logger = logging.getLogger("sqlglot")
    level = sqlglot_logger.level
    sqlglot_logger.setLevel(logging.ERROR)
    try:
        return [s for s in sqlglot.parse(sql, read="postgres") if s is not None]
    except (ParseError, TokenError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
        raise InspectRefused(f"cannot parse the query: {first}") from None
    finally:
        sqlglot_logger.setLevel(level)


def validate(sql: str) -> str:
    """Check ``sql`` and return the statement to run (qualified, re-generated).

    Raises :class:`InspectRefused` naming the first problem found.
    """
    try:
        return _validate(sql)
    except RecursionError:  # sqlglot recurses per nesting level (a few hundred parens)
        raise InspectRefused("query nested too deeply") from None


def _validate(sql: str) -> str:
    if not sql or not sql.strip():
        raise InspectRefused("empty query")
    if len(sql) > MAX_QUERY_CHARS:
        raise InspectRefused(f"query longer than {MAX_QUERY_CHARS} characters")
    if "\x00" in sql:
        raise InspectRefused("NUL character in the query")
    statements = _parse(sql)
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

    kinds, func_classes, names = _allowed()
    tables: list[exp.Table] = []
    for node in list(stmt.walk()):
        if isinstance(node, exp.Identifier):
            _check_identifier(node)
        elif isinstance(node, exp.Dot):
            _check_dot(node)
        elif isinstance(node, exp.Column):
            _check_column(node)
        elif isinstance(node, exp.Cast):
            _check_cast(node)
        elif isinstance(node, (exp.DataType, exp.DataTypeParam)):
            if not isinstance(node.parent, (exp.Cast, exp.DataType, exp.DataTypeParam)):
                raise _refuse_kind(node)
        elif isinstance(node, exp.Table):
            tables.append(node)
        elif isinstance(node, exp.Lambda):
            # sqlglot reads `f(col -> 'k')` as a lambda; PostgreSQL as the JSON operator
            # on the column `col`. Only that one-plain-name form is accepted.
            params = node.expressions
            if len(params) != 1 or not isinstance(params[0], exp.Identifier):
                raise _refuse_kind(node)
        elif isinstance(node, exp.Func):
            _check_function(node, func_classes, names)
        elif type(node) not in kinds:
            raise _refuse_kind(node)
    for table in tables:
        _check_table(table)

    out = str(stmt.sql(dialect="postgres", comments=False))
    # What runs must be what was checked: the generated text parses to the same tree.
    again = _parse(out)
    if len(again) != 1 or again[0] != stmt:
        raise InspectRefused("the query does not survive re-generation unchanged; simplify it")
    # And, on what will run: every relation is pgflow's or a CTE in scope.
    for table in again[0].find_all(exp.Table):
        if isinstance(table.this, exp.Identifier) and _normalize(table.args.get("db")) != SCHEMA:
            name = _normalize(table.this)
            if table.args.get("db") is not None or not _cte_visible(table, name or ""):
                raise InspectRefused(f"relation {_snippet(table)} is not in schema {SCHEMA}")
    return out


def _command_word(stmt: Any) -> str:
    cmd = stmt if isinstance(stmt, exp.Command) else stmt.find(exp.Command)
    if cmd is not None and cmd.this:
        return str(cmd.this).split()[0].upper()
    return str(stmt.key).upper()
