"""Change capture: an app table's inserts, updates and deletes as connector events.

``await pgflow.capture(dsn, "app.payments")`` installs an ``AFTER INSERT OR UPDATE OR
DELETE`` row trigger (SQL: ``SELECT pgflow.capture('app.payments')``) that writes one
row per change to ``pgflow.changes``: the table (for a partition: the root of its
partition tree, by name and oid — a rename keeps the oid), the operation, the primary
key, and the old/new row images as JSONB, with ``tx`` the writer's transaction id. The row is
written in the app's own transaction, so a change is recorded if and only if it
commits, and nothing there NOTIFYs (a per-row NOTIFY serialises every writer in the
cluster). Readers poll.

The change log is tailed like any other table, gap-free in snapshot batches (see
:mod:`pgflow.log.snapshots`)::

    from pgflow.connectors.capture import changes_stream, change_translator
    from pgflow.connectors import table
    payments = table.Connector(changes_stream("app.payments"), table.CursorStore(dsn),
                               change_translator)

Costs and limits: each captured write also inserts a change row (with two JSONB images
for an UPDATE); UPDATEs that change nothing are not recorded; TRUNCATE is not captured;
the log grows until pruned (``pgflow prune`` deletes rows every reader has read).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from pgflow import _db
from pgflow.connectors._base import ConnectorEvent
from pgflow.connectors.table import Row, RowTranslator, TableStream, header_value

__all__ = [
    "Change",
    "capture",
    "change_translator",
    "changes_stream",
    "make_change_translator",
    "prune_changes",
    "uncapture",
]


async def _run(conn_or_dsn: AsyncConnection[Any] | str, query: str, params: Sequence[Any]) -> None:
    if isinstance(conn_or_dsn, str):
        conn = await _db.connect(conn_or_dsn)
        try:
            async with conn.transaction():
                await conn.execute(query, params)
        finally:
            await conn.close()
    else:
        await conn_or_dsn.execute(query, params)


async def capture(
    conn_or_dsn: AsyncConnection[Any] | str, table: str, *, key: Sequence[str] | None = None
) -> None:
    """Install change capture on ``table`` (idempotent). ``key`` defaults to the
    primary key; a table without one needs ``key=[...]`` (a clear error says so).

    With a connection, runs in the caller's transaction (commit it yourself).
    """
    await _run(
        conn_or_dsn, "SELECT pgflow.capture(%s::regclass, %s::text[])", (table, _key_list(key))
    )


def _key_list(key: Sequence[str] | None) -> list[str] | None:
    if key is None:
        return None
    if isinstance(key, str):
        return [key]
    return list(key)


async def uncapture(conn_or_dsn: AsyncConnection[Any] | str, table: str) -> None:
    """Remove change capture from ``table``; recorded changes stay in the log."""
    await _run(conn_or_dsn, "SELECT pgflow.uncapture(%s::regclass)", (table,))


async def prune_changes(conn_or_dsn: AsyncConnection[Any] | str, older_than: timedelta) -> None:
    """Delete ALL change rows older than ``older_than``, read or not. ``pgflow prune``
    (:func:`pgflow.ops.retention.prune`) is the safe way: it deletes only the rows every
    reader of the change log has read."""
    await _run(
        conn_or_dsn,
        "DELETE FROM pgflow.changes WHERE created_at < now() - %s::interval",
        (older_than,),
    )


def _table_name(table: str) -> str:
    parts = [p.strip().strip('"') for p in table.split(".")]
    return ".".join(parts) if len(parts) == 2 else f"public.{parts[0]}"


def changes_stream(
    tables: str | Sequence[str] | None = None,
    *,
    ops: Sequence[str] | None = None,
    name: str | None = None,
    translator: RowTranslator | None = None,
) -> TableStream:
    """The :class:`~pgflow.connectors.table.TableStream` of ``pgflow.changes``, limited to
    ``tables`` (``"schema.table"``; no schema means ``public``) and ``ops``
    (``"INSERT"``, ``"UPDATE"``, ``"DELETE"``) when given. Its rows become events
    through ``translator`` (default :data:`change_translator`)."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if tables is not None:
        names = [tables] if isinstance(tables, str) else list(tables)
        params["tables"] = [_table_name(t) for t in names]
        # By oid, resolved at each read: a rename keeps the oid (rows recorded before
        # and after it are one stream), and a name that no longer resolves is an error
        # ("relation ... does not exist") instead of a silent, empty stream.
        where.append(
            "s.table_oid = ANY(ARRAY(SELECT t::regclass::oid"
            " FROM unnest(%(tables)s::text[]) AS t))"
        )
    if ops is not None:
        wanted = [op.upper() for op in ops]
        bad = set(wanted) - {"INSERT", "UPDATE", "DELETE"}
        if bad or not wanted:
            raise ValueError(f"ops must be INSERT, UPDATE and/or DELETE, not {sorted(bad)}")
        params["ops"] = wanted
        where.append("s.op = ANY(%(ops)s::text[])")
    label = name or "changes:" + (",".join(params.get("tables", [])) or "*")
    return TableStream(
        table="pgflow.changes",
        where=" AND ".join(where) or None,
        params=params,
        name=label,
        translator=translator or change_translator,
    )


@dataclass(frozen=True, slots=True)
class Change:
    """One row of ``pgflow.changes``, decoded."""

    id: int
    table: str
    op: str
    pk: str
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> Change:
        def image(value: Any) -> Mapping[str, Any] | None:
            if value is None or isinstance(value, Mapping):
                return value
            return dict(json.loads(value))

        stamp = row.get("created_at")
        return cls(
            id=int(row["id"]),
            table=str(row["table_name"]),
            op=str(row["op"]),
            pk=str(row["pk"]),
            old=image(row.get("old")),
            new=image(row.get("new")),
            created_at=stamp if isinstance(stamp, datetime) else datetime.now(UTC),
        )

    @property
    def row(self) -> Mapping[str, Any]:
        """The row after the change (before it, for a DELETE)."""
        return self.new if self.new is not None else (self.old or {})

    @property
    def changed(self) -> list[str]:
        """Columns whose value an UPDATE changed (all columns otherwise)."""
        if self.old is None or self.new is None:
            return sorted(self.row)
        return sorted(k for k in self.new if self.new.get(k) != self.old.get(k))


def make_change_translator(
    *,
    type: Callable[[Change], str] | None = None,
    foreign_id: Callable[[Change], str] | None = None,
) -> RowTranslator:
    """A translator for change rows. Defaults: ``type`` is ``"insert"``/``"update"``/
    ``"delete"``, ``foreign_id`` the primary key. Headers are the row's columns as
    strings (after the change; before it for a DELETE) plus ``pgflow.table``,
    ``pgflow.op`` and ``pgflow.changed`` (comma-separated changed columns).

    A ``type``/``foreign_id`` function raises ``ValueError`` for a change it cannot
    use (dead-lettered) — e.g. ``type=lambda c: f"payment.{c.new['status']}"``.
    """

    def translate(row: Row) -> ConnectorEvent:
        change = Change.from_row(row)
        headers = {k: header_value(v) for k, v in change.row.items() if v is not None}
        headers["pgflow.table"] = change.table
        headers["pgflow.op"] = change.op
        headers["pgflow.changed"] = ",".join(change.changed)
        event_type = type(change) if type is not None else change.op.lower()
        fid = foreign_id(change) if foreign_id is not None else change.pk
        if not event_type or not fid:
            raise ValueError(f"change {change.id}: empty type or foreign id")
        return ConnectorEvent(str(change.id), fid, event_type, headers, change.created_at)

    if foreign_id is None:
        # Lets data erasure find a foreign id's change rows in SQL (TableStream.erase_for).
        translate.foreign_id_column = "pk"  # type: ignore[attr-defined]
    return translate


#: The default change translator (see :func:`make_change_translator`).
change_translator: RowTranslator = make_change_translator()
