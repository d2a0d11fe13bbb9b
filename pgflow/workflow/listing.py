"""Looking at runs: one run, the newest of a foreign id, a page of them, waiting for one.

:class:`RunReader` is the read side of :class:`pgflow.API` (``latest``, ``get``,
``exists``, ``wait_for``, ``list``); the API adds triggering and moving runs.

Listing: luno's ``RecordStore.List(wf, offset, limit, order, FilterBy...)`` pages with
OFFSET, which reads and throws away every skipped row (page 1,000 of 50 reads 50,000
rows) and skips or repeats rows when runs are created while someone pages. pgflow pages
by key instead: a page ends with an opaque ``after`` token holding the last row's
``(created_at, run_id)``, and the next page starts strictly after it, so each page
reads ``limit`` index entries whatever the table size, and paging is stable under
inserts.

Index-ordered (one index range, no sort) for: no filter, one ``status``, one
``run_state`` (indexes ``records_list_*``) and ``foreign_id`` (``records_workflow_
foreign_id``); ``created_after``/``created_before`` narrow any of them. Several values
of one filter (``status=[A, B]``) are allowed (luno #94) but sorted per page.

The filter is written down once, as the keywords of :class:`RunFilter`, which
``list_records``, ``Workflow.list`` and ``pgflow.sync``'s ``list`` all accept.
:func:`list_records` takes a connection and a workflow *name*, so tools without a built
:class:`pgflow.Workflow` (the CLI, a web console) share it; ``Workflow.list`` is its
typed face.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypedDict, TypeVar, Unpack
from uuid import UUID

from psycopg import AsyncConnection

from pgflow.errors import InvalidTransition, NotFound
from pgflow.workflow._batch_api import Batch
from pgflow.workflow._engine import Engine
from pgflow.workflow.records import (
    RECORD_COLUMNS,
    RawRecord,
    Record,
    RunState,
    load_latest,
    load_run,
)

__all__ = ["MAX_LIMIT", "Order", "Page", "RunFilter", "RunId", "RunReader", "list_records"]

R = TypeVar("R")
K = TypeVar("K")
T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)
Order = Literal["asc", "desc"]
RunId = str | uuid.UUID
#: The largest page (a bigger one would hold the connection and memory for long).
MAX_LIMIT = 10_000


class RunFilter(TypedDict, Generic[K], total=False):
    """The keywords of a listing (``K``: the status type, an enum or its names).

    Filters combine with AND; each takes one value or several (OR).
    ``created_after``/``created_before`` are exclusive bounds. ``order`` (default
    ``"desc"``: newest first), ``limit`` (default 50, at most :data:`MAX_LIMIT`) and
    ``after`` (the previous page's :attr:`Page.after`) page through the result."""

    status: K | Iterable[K] | None
    run_state: RunState | str | Iterable[RunState | str] | None
    foreign_id: str | Iterable[str] | None
    created_after: datetime | None
    created_before: datetime | None
    order: Order
    limit: int
    after: str | None


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
    conn: AsyncConnection[Any], workflow: str, **query: Unpack[RunFilter[str]]
) -> Page[RawRecord]:
    """One page of ``workflow``'s runs (see :class:`RunFilter` for the keywords);
    ``status`` is the status *name*. Pass the previous page's ``after`` to get the next
    page (same filters and order).
    """
    unknown = query.keys() - RunFilter.__optional_keys__
    if unknown:  # ** takes any keyword: say what a real signature would have said
        raise TypeError(f"list() got an unexpected keyword argument {min(unknown)!r}")
    order = query.get("order", "desc")
    limit = query.get("limit", 50)
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

    match("status", _values("status", query.get("status"), str))
    states = _values("run_state", query.get("run_state"), (str, RunState))
    if states is not None:
        try:
            states = [str(RunState(str(s).upper())) for s in states]
        except ValueError as exc:
            known = ", ".join(s.name for s in RunState)
            raise ValueError(f"run_state: {exc} (known: {known})") from None
    match("run_state", states)
    match("foreign_id", _values("foreign_id", query.get("foreign_id"), str))
    op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
    after = query.get("after")
    key = _decode(after, order) if after is not None else None
    for name, bound, bound_op in (
        ("created_after", query.get("created_after"), ">"),
        ("created_before", query.get("created_before"), "<"),
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


class RunReader(Generic[T, S]):
    """The read side of :class:`pgflow.API`: one workflow's runs, as typed records.

    Reads run on the bound connection (seeing the caller's uncommitted work) or on a
    pooled one; in an optimistic connector batch they first write the buffered
    triggers, so a function sees the runs it triggered (read-your-writes)."""

    _engine: Engine[T, S]
    _conn: AsyncConnection[Any] | None
    _batch: Batch | None

    @property
    def name(self) -> str:
        return self._engine.name

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection[Any]]:
        if self._batch is not None:
            await self._batch.flush()  # read your own (buffered) triggers
        if self._conn is not None:
            yield self._conn
            return
        pool = await self._engine.pool()
        async with pool.connection() as conn:
            yield conn

    def _record(self, raw: RawRecord) -> Record[T, S]:
        return self._engine.to_record(raw)

    async def latest(self, foreign_id: str) -> Record[T, S]:
        """The newest run of ``foreign_id``; raises :class:`pgflow.NotFound`."""
        async with self._read() as conn:
            raw = await load_latest(conn, self.name, foreign_id)
        if raw is None:
            raise NotFound(f"workflow {self.name!r}: no run for foreign id {foreign_id!r}")
        return self._record(raw)

    async def get(self, foreign_id: str, run_id: RunId) -> Record[T, S]:
        """One run by id; raises :class:`pgflow.NotFound`."""
        async with self._read() as conn:
            raw = await load_run(conn, self.name, foreign_id, run_id)
        if raw is None:
            raise NotFound(f"workflow {self.name!r}: no run {run_id} for {foreign_id!r}")
        return self._record(raw)

    async def exists(self, foreign_id: str) -> bool:
        """Whether ``foreign_id`` ever had a run of this workflow."""
        async with self._read() as conn:
            cur = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pgflow.records WHERE workflow = %s"
                " AND foreign_id = %s)",
                (self.name, foreign_id),
            )
            row = await cur.fetchone()
        return bool(row and row[0])

    async def wait_for(
        self,
        foreign_id: str,
        run_id: RunId,
        status: S,
        timeout: float | None = 10.0,
    ) -> Record[T, S]:
        """Wait until the run has reached ``status`` (now or earlier) and return its
        record as it is now. Raises ``TimeoutError`` after ``timeout`` seconds,
        :class:`pgflow.NotFound` for an unknown run, and
        :class:`pgflow.InvalidTransition` when the run ended without reaching it."""
        target = self._engine.statuses.coerce(status)
        rid = uuid.UUID(str(run_id))
        deadline = None if timeout is None else time.monotonic() + timeout
        listener = self._engine.listener
        sub = listener.subscribe(self.name) if listener is not None and self._conn is None else None
        delay = 0.01
        sql = (
            f"SELECT {RECORD_COLUMNS}, EXISTS (SELECT 1 FROM pgflow.events e"
            " WHERE e.stream = r.workflow AND e.foreign_id = r.foreign_id"
            " AND e.run_id = r.run_id AND e.type = %s)"
            " FROM pgflow.records r WHERE r.run_id = %s AND r.workflow = %s"
            " AND r.foreign_id = %s"
        )
        try:
            while True:
                async with self._read() as conn:
                    cur = await conn.execute(sql, (target.name, rid, self.name, foreign_id))
                    row = await cur.fetchone()
                if row is None:
                    raise NotFound(f"workflow {self.name!r}: no run {rid} for {foreign_id!r}")
                raw = RawRecord.from_row(row[:-1])
                if row[-1] or raw.status == target.name:
                    return self._record(raw)
                if raw.run_state.finished:
                    raise InvalidTransition(
                        f"workflow {self.name!r}: run {rid} of {foreign_id!r} ended "
                        f"({raw.run_state} at {raw.status}) without reaching {target.name}"
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"workflow {self.name!r}: run {rid} of {foreign_id!r} did not reach "
                        f"{target.name} within {timeout}s (it is at {raw.status}, "
                        f"{raw.run_state})"
                    )
                pause = delay if remaining is None else min(delay, remaining)
                if sub is not None:
                    await sub.wait(pause)
                else:
                    await asyncio.sleep(pause)
                delay = min(delay * 2, 0.5)
        finally:
            if sub is not None:
                sub.close()

    async def list(self, **query: Unpack[RunFilter[S]]) -> Page[Record[T, S]]:
        """One page of this workflow's runs (luno ``List`` with ``FilterBy...``); the
        keywords are :class:`RunFilter`'s.

        Keyset-paginated: pass ``page.after`` back as ``after=`` for the next page;
        ``page.after`` is None on the last one. See :mod:`pgflow.workflow.listing`.
        """
        status = query.get("status")
        names: list[str] | None = None
        if status is not None:
            items = [status] if isinstance(status, enum.Enum | str) else list(status)
            try:
                names = [self._engine.statuses.coerce(s).name for s in items]
            except ValueError as exc:
                raise ValueError(f"workflow {self.name!r}: status: {exc}") from None
        async with self._read() as conn:
            by_name: RunFilter[str] = {**query, "status": names}
            page = await list_records(conn, self.name, **by_name)
        return Page([self._record(raw) for raw in page.records], page.after)
