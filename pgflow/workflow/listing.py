"""Listing runs: filters and keyset pagination over ``pgflow.records``.

luno's ``RecordStore.List(wf, offset, limit, order, FilterBy...)`` pages with OFFSET,
which reads and throws away every skipped row (page 1,000 of 50 reads 50,000 rows) and
skips or repeats rows when runs are created while someone pages. pgflow pages by key
instead: a page ends with an opaque ``after`` token holding the last row's
``(created_at, run_id)``, and the next page starts strictly after it, so each page
reads ``limit`` index entries whatever the table size, and paging is stable under
inserts.

Index-ordered (one index range, no sort) for: no filter, one ``status``, one
``run_state`` (indexes ``records_list_*``) and ``foreign_id`` (``records_workflow_
foreign_id``); ``created_after``/``created_before`` narrow any of them. Several values
of one filter (``status=[A, B]``) are allowed (luno #94) but sorted per page.

:func:`list_records` takes a connection and a workflow *name*, so tools without a built
:class:`pgflow.Workflow` (the CLI, a web console) share it; ``Workflow.list`` is its
typed face.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar
from uuid import UUID

from psycopg import AsyncConnection

from pgflow.workflow.records import RECORD_COLUMNS, RawRecord, RunState

__all__ = ["MAX_LIMIT", "Order", "Page", "list_records"]

R = TypeVar("R")
Order = Literal["asc", "desc"]
#: The largest page (a bigger one would hold the connection and memory for long).
MAX_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Page(Generic[R]):
    """One page of records; ``after`` is the token of the next page (None: last page)."""

    records: list[R]
    after: str | None

    def __iter__(self) -> Iterator[R]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def _values(name: str, value: Any, kind: type | tuple[type, ...]) -> list[Any] | None:
    """None, one value or an iterable of values -> None or a non-empty list."""
    if value is None:
        return None
    items = [value] if isinstance(value, (str, kind)) else list(value)
    if not items:
        raise ValueError(f"{name}: an empty list matches nothing; pass None for no filter")
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f"{name}: expected {kind}, got {item!r}")
    return items


def _encode(created_at: datetime, run_id: UUID, order: Order) -> str:
    raw = json.dumps([created_at.isoformat(), str(run_id), order], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(token: str, order: Order) -> tuple[datetime, UUID]:
    try:
        padded = token + "=" * (-len(token) % 4)
        created, run_id, token_order = json.loads(base64.urlsafe_b64decode(padded))
        key = (datetime.fromisoformat(created), UUID(run_id))
    except (ValueError, TypeError, binascii.Error):
        raise ValueError(f"after: {token!r} is not a page token from list()") from None
    if token_order != order:
        raise ValueError(
            f"after: the token is from an order={token_order!r} listing, not {order!r}"
        )
    return key


async def list_records(
    conn: AsyncConnection[Any],
    workflow: str,
    *,
    status: str | Iterable[str] | None = None,
    run_state: RunState | str | Iterable[RunState | str] | None = None,
    foreign_id: str | Iterable[str] | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    order: Order = "desc",
    limit: int = 50,
    after: str | None = None,
) -> Page[RawRecord]:
    """One page of ``workflow``'s runs, newest first (``order="desc"``) or oldest first.

    Filters combine with AND; each takes one value or several (OR). ``status`` is the
    status *name*. ``created_after``/``created_before`` are exclusive bounds. Pass the
    previous page's ``after`` to get the next page (same filters and order).
    """
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an int from 1 to {MAX_LIMIT}, got {limit!r}")
    where = ["workflow = %s"]
    params: list[Any] = [workflow]

    def match(column: str, values: Sequence[Any] | None) -> None:
        if values is None:
            return
        if len(values) == 1:  # "=" lets the planner walk the index in order
            where.append(f"{column} = %s")
            params.append(values[0])
        else:
            where.append(f"{column} = ANY(%s)")
            params.append(list(values))

    match("status", _values("status", status, str))
    states = _values("run_state", run_state, (str, RunState))
    if states is not None:
        try:
            states = [str(RunState(str(s).upper())) for s in states]
        except ValueError as exc:
            known = ", ".join(s.name for s in RunState)
            raise ValueError(f"run_state: {exc} (known: {known})") from None
    match("run_state", states)
    match("foreign_id", _values("foreign_id", foreign_id, str))
    op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
    key = _decode(after, order) if after is not None else None
    for name, bound, bound_op in (
        ("created_after", created_after, ">"),
        ("created_before", created_before, "<"),
    ):
        if bound is None:
            continue
        if not isinstance(bound, datetime):
            raise TypeError(f"{name}: expected a datetime, got {bound!r}")
        if key is not None and bound_op == op:
            # Same direction as the page key: keep only the stricter of the two, as
            # btree does not combine a row comparison with a scalar bound and might
            # start its scan at the weaker one.
            key_is_stricter = key[0] > bound if op == ">" else key[0] < bound
            if key_is_stricter:
                continue
            key = None
        where.append(f"created_at {bound_op} %s")
        params.append(bound)
    if key is not None:
        where.append(f"(created_at, run_id) {op} (%s, %s)")
        params += list(key)
    cur = await conn.execute(
        f"SELECT {RECORD_COLUMNS} FROM pgflow.records WHERE {' AND '.join(where)}"
        f" ORDER BY created_at {direction}, run_id {direction} LIMIT %s",
        [*params, limit + 1],
    )
    rows = [RawRecord.from_row(r) for r in await cur.fetchall()]
    more = len(rows) > limit
    rows = rows[:limit]
    token = None
    if more:
        last = rows[-1]
        assert last.created_at is not None
        token = _encode(last.created_at, last.run_id, order)
    return Page(rows, token)
