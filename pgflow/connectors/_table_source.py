"""Table sources of :mod:`pgflow.connectors.table`: what is read, and the DDL to make
a table readable.

A :class:`TableStream` is a table or a query read in snapshot batches through
:func:`pgflow.log.snapshots.diff_read_sql` (the visibility rule is written there, not
here); :func:`add_tx_column` adds the ``tx xid8`` column, its index and the trigger
that stamps it, which that read needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from psycopg import AsyncConnection, sql

from pgflow import _db
from pgflow.connectors._table_rows import Row, RowTranslator
from pgflow.errors import ConfigError
from pgflow.log.snapshots import DiffRead, Position, diff_read_sql

__all__ = ["Source", "TableStream", "add_tx_column"]


class Source(Protocol):
    """Something that can be read in cursor order: a table, a query, the event log."""

    @property
    def label(self) -> str:
        """A short name for logs and ``pgflow.cursors.stream``."""
        ...

    async def read(
        self, conn: AsyncConnection[Any], after: Position, limit: int
    ) -> list[tuple[Position, Row]]:
        """Up to ``limit`` rows after ``after``, in order, each with its position."""
        ...


def _qualified(name: str) -> sql.Composable:
    parts = [p.strip().strip('"') for p in name.split(".")]
    if not all(parts) or len(parts) > 2:
        raise ConfigError(f"bad table name {name!r}: use 'table' or 'schema.table'")
    return sql.SQL(".").join(sql.Identifier(p) for p in parts)


@dataclass(frozen=True, slots=True)
class TableStream:
    """Describes a source table or query and how to read it in order.

    Give ``table`` (``"schema.table"``) or ``query`` (any ``SELECT`` exposing the id and
    tx columns; it becomes a subquery aliased ``s``). ``columns`` limits what is
    selected (default: all); ``where`` is an extra, trusted SQL predicate over ``s``
    (e.g. ``"s.kind = %(kind)s"``) with ``params`` as its named parameters.
    """

    table: str | None = None
    query: str | None = None
    id_column: str = "id"
    tx_column: str | None = "tx"
    columns: Sequence[str] | None = None
    where: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    #: the translator a Connector uses for this source when given none
    translator: RowTranslator | None = None

    def __post_init__(self) -> None:
        if (self.table is None) == (self.query is None):
            raise ConfigError("TableStream needs exactly one of table= or query=")
        if self.table is not None:
            _qualified(self.table)
        if self.columns is not None and not self.columns:
            raise ConfigError("columns must be None (all) or non-empty")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.table:
            return self.table
        assert self.query is not None
        return "query:" + hashlib.sha1(self.query.encode()).hexdigest()[:10]

    def read_sql(self) -> sql.Composed:
        """The next chunk after a position (``__``-prefixed parameters, see
        :func:`pgflow.log.snapshots.diff_read_sql`); id order."""
        source: sql.Composable
        if self.table is not None:
            source = sql.SQL("SELECT * FROM {}").format(_qualified(self.table))
        else:
            assert self.query is not None
            source = sql.SQL(self.query)  # trusted SQL, from code
        relation = sql.SQL("(SELECT * FROM ({source}) s WHERE {where})").format(
            source=source, where=sql.SQL(self.where or "true")
        )
        cols: sql.Composable = (
            sql.SQL("e.*")
            if self.columns is None
            else sql.SQL(", ").join(sql.SQL("e.{}").format(sql.Identifier(c)) for c in self.columns)
        )
        id_col = sql.Identifier(self.id_column)
        if self.tx_column is None:
            return sql.SQL(
                "SELECT NULL, NULL, NULL, e.{id} AS __id, {cols} FROM {relation} e"
                " WHERE e.{id} > %(__after)s::bigint ORDER BY e.{id} LIMIT %(__limit)s"
            ).format(id=id_col, cols=cols, relation=relation)
        # diff_read_sql composes plain SQL text; the identifiers are quoted here first.
        return sql.SQL(
            diff_read_sql(
                relation="{relation}",
                columns="{cols}",
                tx="{tx}",
                id="{id}",
                keep_empty=True,
            )
        ).format(relation=relation, cols=cols, tx=sql.Identifier(self.tx_column), id=id_col)

    async def erase_for(
        self, conn: AsyncConnection[Any], translator: RowTranslator, foreign_id: str
    ) -> int:
        """Erase (NULL the row images of) the rows of the change log this stream
        delivers whose event would name ``foreign_id``. Only for ``pgflow.changes``: a
        user's table is theirs. A translator that declares its foreign id column
        (``translator.foreign_id_column``, the default change translator's ``pk``) is
        matched in SQL; any other is applied to every row of the stream (erasure is
        rare; correctness over speed)."""
        if self.table != "pgflow.changes":
            return 0
        relation = sql.SQL("(SELECT * FROM pgflow.changes s WHERE {where})").format(
            where=sql.SQL(self.where or "true")
        )
        column = getattr(translator, "foreign_id_column", None)
        if column is not None:
            cur = await conn.execute(
                sql.SQL(
                    "UPDATE pgflow.changes c SET old = NULL, new = NULL FROM {relation} e"
                    " WHERE c.id = e.id AND e.{col} = %(__fid)s"
                    " AND (c.old IS NOT NULL OR c.new IS NOT NULL)"
                ).format(relation=relation, col=sql.Identifier(column)),
                {**self.params, "__fid": foreign_id},
            )
            return max(cur.rowcount, 0)
        ids: list[int] = []
        cur = await conn.execute(
            sql.SQL(
                "SELECT e.* FROM {relation} e WHERE e.old IS NOT NULL OR e.new IS NOT NULL"
            ).format(relation=relation),
            dict(self.params),
        )
        names = [d.name for d in (cur.description or [])]
        for raw in await cur.fetchall():
            row = dict(zip(names, raw, strict=True))
            try:
                if translator(row).foreign_id == foreign_id:
                    ids.append(int(row["id"]))
            except (ValueError, KeyError, TypeError):
                continue  # a row it cannot translate was never delivered as an event
        if ids:
            await conn.execute(
                "UPDATE pgflow.changes SET old = NULL, new = NULL WHERE id = ANY(%s)", (ids,)
            )
        return len(ids)

    async def read(
        self, conn: AsyncConnection[Any], after: Position, limit: int
    ) -> list[tuple[Position, Row]]:
        return (await self.read_or_idle(conn, after, limit))[0]

    async def read_or_idle(
        self, conn: AsyncConnection[Any], after: Position, limit: int
    ) -> tuple[list[tuple[Position, Row]], Position | None]:
        """:meth:`read`, and when nothing is new, the position an idle reader may move
        to (the read's own snapshot: nothing of this source committed before it)."""
        params = {**self.params, **after.params(), "__limit": limit + 1}
        cur = await conn.execute(self.read_sql(), params)
        names = [d.name for d in (cur.description or [])][4:]
        raw = await cur.fetchall()
        if self.tx_column is None:
            return [
                (Position(after.snapshot, None, int(r[3])), dict(zip(names, r[4:], strict=True)))
                for r in raw[:limit]
            ], None
        read = DiffRead.from_rows(after, raw, limit)
        if not read.raw and after.upto is not None:  # exhausted diff: go on from its end
            return await self.read_or_idle(conn, Position(after.upto), limit)
        return [
            (p, dict(zip(names, r, strict=True)))
            for p, r in zip(read.positions, read.rows, strict=True)
        ], read.idle_position()


async def add_tx_column(
    conn_or_dsn: AsyncConnection[Any] | str,
    table: str,
    *,
    column: str = "tx",
    id_column: str = "id",
) -> None:
    """Make ``table`` tail-able gap-free: add ``column xid8 NOT NULL DEFAULT
    pg_current_xact_id()``, the ``(tx, id)`` index and a trigger that stamps the column
    on INSERT whatever the INSERT says (all idempotent). The read also walks an index on
    ``id`` (usually the primary key).

    Existing rows get this transaction's id (they are all delivered, in id order).
    Rewrites the table (see the module doc for big tables).
    """
    name = _qualified(table)
    index = sql.Identifier(f"{table.split('.')[-1].strip(chr(34))}_{column}_{id_column}_idx")
    statements = [
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} xid8 NOT NULL DEFAULT pg_current_xact_id()"
        ).format(name, sql.Identifier(column)),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({}, {})").format(
            index, name, sql.Identifier(column), sql.Identifier(id_column)
        ),
        sql.SQL(
            "CREATE OR REPLACE TRIGGER pgflow_stamp_tx BEFORE INSERT ON {} FOR EACH ROW"
            " EXECUTE FUNCTION {}"
        ).format(
            name,
            sql.SQL("pgflow.stamp_tx()")
            if column == "tx"
            else sql.SQL("pgflow.stamp_tx_column({})").format(sql.Literal(column)),
        ),
    ]
    if isinstance(conn_or_dsn, str):
        conn = await _db.connect(conn_or_dsn)
        try:
            async with conn.transaction():
                for stmt in statements:
                    await conn.execute(stmt)
        finally:
            await conn.close()
    else:
        for stmt in statements:
            await conn_or_dsn.execute(stmt)
