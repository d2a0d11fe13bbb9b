"""What every console query shares: dict rows, capped counts and keyset page tokens.

A list page ends with an opaque token holding the last row's sort key, never an
``OFFSET``, so page 1000 costs what page 1 costs; a count stops at a cap and says
"10,000+" rather than count a whole table on a page load.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

__all__ = [
    "CappedCount",
    "Page",
    "Row",
    "capped",
    "decode_token",
    "encode_token",
    "fetch_all",
    "fetch_one",
    "view_columns",
]

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class CappedCount:
    """A count that stopped at ``cap``: ``exact`` is False when there are more."""

    value: int
    exact: bool

    def __str__(self) -> str:
        return f"{self.value:,}" if self.exact else f"{self.value - 1:,}+"


def capped(n: int, cap: int) -> CappedCount:
    """``n`` rows counted with ``LIMIT cap + 1``."""
    return CappedCount(n, n <= cap)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of rows and the token of the next page (None on the last)."""

    rows: list[Row]
    next_token: str | None


def encode_token(*key: Any) -> str:
    """An opaque, URL-safe page token for a keyset position."""
    plain = json.dumps([k.isoformat() if isinstance(k, datetime) else str(k) for k in key])
    return base64.urlsafe_b64encode(plain.encode()).decode().rstrip("=")


def decode_token(token: str, arity: int) -> list[str]:
    """The keyset position of ``token``; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        key = json.loads(raw)
    except (ValueError, json.JSONDecodeError):
        raise ValueError("bad page token") from None
    if not isinstance(key, list) or len(key) != arity or not all(isinstance(k, str) for k in key):
        raise ValueError("bad page token")
    return key


async def fetch_all(
    conn: AsyncConnection[Any], sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
) -> list[Row]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return await cur.fetchall()


async def fetch_one(conn: AsyncConnection[Any], sql: str, params: Sequence[Any] = ()) -> Row | None:
    rows = await fetch_all(conn, sql, params)
    return rows[0] if rows else None


async def view_columns(conn: AsyncConnection[Any], view: str) -> frozenset[str]:
    """Column names of ``pgflow.<view>`` (so newer columns such as ``run_state_reason``
    are shown when the installed schema has them)."""
    cur = await conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attnum > 0 AND NOT attisdropped",
        [f"pgflow.{view}"],
    )
    return frozenset(str(r[0]) for r in await cur.fetchall())
