"""Table rows as connector events: the translators of :mod:`pgflow.connectors.table`.

A translator turns one row (a mapping of column names to values) into a
:class:`~pgflow.connectors.ConnectorEvent`, or raises ``ValueError`` for a row it cannot
use (the runner dead-letters it). Values become header strings by one rule,
:func:`header_value`, so every source (tables, the change log, other workflows' event
logs) writes headers the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

from pgflow.connectors._base import ConnectorEvent

__all__ = [
    "Row",
    "RowTranslator",
    "default_translator",
    "header_value",
    "jsonable_row",
    "make_translator",
]

Row = Mapping[str, Any]
RowTranslator = Callable[[Row], ConnectorEvent]


def header_value(value: Any) -> str:
    """A column value as a header string (ISO timestamps, JSON for json/arrays)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal | UUID):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return json.dumps(value, default=str, separators=(",", ":"))


def make_translator(
    *,
    id: str = "id",
    foreign_id: str = "foreign_id",
    type: str = "type",
    created_at: str = "created_at",
    exclude: Sequence[str] = ("tx",),
    id_prefix: str = "",
) -> RowTranslator:
    """A row translator reading the event fields from the named columns.

    Every other non-NULL column (except ``exclude``) becomes a header, as a string.
    ``foreign_id`` and ``type`` must be present and non-empty, else ``ValueError``.
    """
    used = {id, foreign_id, type, created_at, *exclude}

    def translate(row: Row) -> ConnectorEvent:
        for col in (id, foreign_id, type):
            if col not in row:
                raise ValueError(f"row has no {col!r} column")
            if row[col] is None or row[col] == "":
                raise ValueError(f"column {col!r} is empty")
        stamp = row.get(created_at)
        headers = {
            str(k): header_value(v) for k, v in row.items() if k not in used and v is not None
        }
        return ConnectorEvent(
            id=id_prefix + str(row[id]),
            foreign_id=header_value(row[foreign_id]),
            type=header_value(row[type]),
            headers=headers,
            created_at=stamp if isinstance(stamp, datetime) else datetime.now(UTC),
        )

    return translate


#: id, foreign_id and type columns; every other column (but ``tx``) as a header.
default_translator: RowTranslator = make_translator()


def jsonable_row(row: Row) -> dict[str, Any]:
    return {str(k): (v if v is None else header_value(v)) for k, v in row.items()}
