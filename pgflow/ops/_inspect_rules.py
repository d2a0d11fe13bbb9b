"""The allow-lists of ``pgflow inspect`` queries, and what they are learnt into.

See :mod:`pgflow.ops.inspect` for the fences around the check and
:mod:`pgflow.ops._inspect_validate` for the check itself. The rule: a node kind,
function, cast type or name form is accepted only because it is listed here (learnt from
example SQL written in PostgreSQL terms); everything else is refused with a one-line
reason naming what was found. Where PostgreSQL and sqlglot could read a construct
differently, the construct is refused rather than interpreted.
"""

from __future__ import annotations

import functools
from typing import Any

import sqlglot
from sqlglot import exp

from pgflow.errors import InspectError, InspectRefused

__all__ = [
    "ALLOWED_FUNCTIONS",
    "ALLOWED_SYNTAX",
    "ALLOWED_TYPES",
    "DENIED_FUNCTIONS",
    "InspectError",
    "InspectRefused",
    "MAX_PAD",
    "SYSTEM_COLUMNS",
]

SCHEMA = "pgflow"
#: Largest ``lpad``/``rpad`` length and ``format`` width: bigger ones turn a short query
#: into a huge value (``format('%2000000000s', 'x')`` is 2 GB on the server).
MAX_PAD = 10_000
#: Longest query text accepted (bounds nesting and constant sizes).
MAX_QUERY_CHARS = 100_000
#: PostgreSQL truncates identifiers to 63 bytes; longer ones could alias each other there.
MAX_IDENTIFIER_BYTES = 63


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
