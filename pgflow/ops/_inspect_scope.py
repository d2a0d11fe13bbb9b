"""Which names a ``pgflow inspect`` query can see where: CTEs and FROM items in scope.

The validator (:mod:`pgflow.ops._inspect_validate`) needs PostgreSQL's answer to "is
``a`` in ``a.f`` a table of the FROM clause here?": if it is not, the server reads
``a.f`` as the function call ``f(a)``. These functions give that answer from sqlglot's
tree, erring on the side of fewer names (a refusal the user can work around).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlglot import exp

from pgflow.ops._inspect_rules import _fold


def _normalize(ident: Any) -> str | None:
    if not isinstance(ident, exp.Identifier):
        return None
    return _fold(str(ident.this), quoted=bool(ident.args.get("quoted")))


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
