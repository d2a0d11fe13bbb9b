"""Validation of ``pgflow inspect`` queries: the walk over sqlglot's syntax tree.

See :mod:`pgflow.ops.inspect` for the fences around it. Every node of the parsed query
is checked against the allow-lists of :mod:`pgflow.ops._inspect_rules` (node kinds,
functions, cast types); names are checked against what is in scope where they stand
(:mod:`pgflow.ops._inspect_scope`). The first problem found is refused with a one-line
reason; what passes is re-generated, re-parsed and must come back the same.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from pgflow.ops._inspect_rules import (
    _FORBIDDEN_NODES,
    _KIND_NAMES,
    _QUERY_TYPES,
    ALLOWED_FUNCTIONS,
    ALLOWED_SYNTAX,
    ALLOWED_TYPES,
    DENIED_FUNCTIONS,
    MAX_IDENTIFIER_BYTES,
    MAX_PAD,
    MAX_QUERY_CHARS,
    SCHEMA,
    SYSTEM_COLUMNS,
    InspectError,
    InspectRefused,
    _allowed,
    _fold,
)
from pgflow.ops._inspect_scope import _cte_visible, _normalize, _visible_relations

__all__ = [
    "ALLOWED_FUNCTIONS",
    "ALLOWED_SYNTAX",
    "ALLOWED_TYPES",
    "InspectError",
    "InspectRefused",
    "MAX_PAD",
    "validate",
]


def _check_identifier(ident: exp.Identifier) -> None:
    name = str(ident.this)
    if "\x00" in name:
        raise InspectRefused("NUL character in an identifier")
    if not ident.args.get("quoted") and not name.isascii():
        raise InspectRefused(f"non-ASCII unquoted identifier {name!r} (quote it)")
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise InspectRefused(f"identifier longer than {MAX_IDENTIFIER_BYTES} bytes: {name[:20]}...")


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
