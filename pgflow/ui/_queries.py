"""Every database read and write the console makes, in one place.

The console must stay fast on big tables (a million runs, ten million events), so each
query here is shaped for an index (``migrations/0010_ui_indexes.sql``):

* lists are **keyset-paginated** — the page token is the last row's sort key, never an
  ``OFFSET`` — so page 1000 costs what page 1 costs;
* counts are **capped**: ``count(*)`` over ``LIMIT cap + 1`` rows of an index, shown as
  "10,000+" when the cap is hit. A whole-table ``count(*)`` never runs on a page load;
* distinct workflows / statuses come from a loose index scan (a recursive CTE hopping
  through the ``(workflow, status, ...)`` index), not ``SELECT DISTINCT`` over the table;
* consumer lag counts at most ``cap + 1`` events ahead of each cursor.

Reads go through pgflow's human views (``pgflow.runs``, ``pgflow.run_history``,
``pgflow.stuck_runs``, ``pgflow.horizon``) where they push down to the indexes, so psql
users see the same thing. Writes (pause, resume, cancel, retry, replay) go through
:mod:`pgflow.workflow.actions` and the CLI's ``replay_dead_letter``: the console can do nothing the
engine and ``pgflow`` CLI would not. The Query page runs :func:`pgflow.ops.inspect.inspect`
(its validation and read-only fences), never SQL of its own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from pgflow.cli._runs import replay_dead_letter
from pgflow.ops.inspect import InspectResult, inspect
from pgflow.workflow import actions
from pgflow.workflow.records import RunState

__all__ = [
    "ACTIVE_STATES",
    "RUN_STATES",
    "CappedCount",
    "Page",
    "RunFilter",
    "act_on_run",
    "consumer_lag",
    "dead_letter",
    "dead_letters",
    "horizon",
    "query",
    "replay",
    "run",
    "run_history",
    "run_state_counts",
    "runs",
    "status_counts",
    "stuck_runs",
    "view_columns",
    "workflows",
]

RUN_STATES = tuple(str(s) for s in RunState)
ACTIVE_STATES = ("INITIATED", "RUNNING", "PAUSED")
#: default cap of every count the console shows ("10,000+")
COUNT_CAP = 10_000
#: cap of the events-behind count per consumer shard ("1,000+"): counting walks the
#: events index and fetches rows to check the shard, so a far-behind consumer of a rare
#: type costs one fetch per event counted (a 10,000 cap measured 0.5-1.2 s per page)
LAG_CAP = 1_000

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class CappedCount:
    """A count that stopped at ``cap``: ``exact`` is False when there are more."""

    value: int
    exact: bool

    def __str__(self) -> str:
        return f"{self.value:,}" if self.exact else f"{self.value - 1:,}+"


def _capped(n: int, cap: int) -> CappedCount:
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


async def _all(
    conn: AsyncConnection[Any], sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
) -> list[Row]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return await cur.fetchall()


async def _one(conn: AsyncConnection[Any], sql: str, params: Sequence[Any] = ()) -> Row | None:
    rows = await _all(conn, sql, params)
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


# ------------------------------------------------------------------ workflows
async def workflows(conn: AsyncConnection[Any]) -> list[str]:
    """Workflow names that have runs: a loose index scan, a few index probes each."""
    rows = await _all(
        conn,
        """
        WITH RECURSIVE w(name) AS (
            (SELECT workflow FROM pgflow.records ORDER BY workflow LIMIT 1)
            UNION ALL
            SELECT (SELECT r.workflow FROM pgflow.records r WHERE r.workflow > w.name
                    ORDER BY r.workflow LIMIT 1)
            FROM w WHERE w.name IS NOT NULL
        )
        SELECT name FROM w WHERE name IS NOT NULL LIMIT 1000
        """,
    )
    return [r["name"] for r in rows]


async def statuses(conn: AsyncConnection[Any], workflow: str) -> list[str]:
    """Statuses runs of ``workflow`` are at (loose scan of ``(workflow, status, ...)``)."""
    rows = await _all(
        conn,
        """
        WITH RECURSIVE s(name) AS (
            (SELECT status FROM pgflow.records WHERE workflow = %(w)s ORDER BY status LIMIT 1)
            UNION ALL
            SELECT (SELECT r.status FROM pgflow.records r
                    WHERE r.workflow = %(w)s AND r.status > s.name
                    ORDER BY r.status LIMIT 1)
            FROM s WHERE s.name IS NOT NULL
        )
        SELECT name FROM s WHERE name IS NOT NULL LIMIT 1000
        """,
        {"w": workflow},
    )
    return [r["name"] for r in rows]


async def run_state_counts(
    conn: AsyncConnection[Any], workflow: str | None, cap: int = COUNT_CAP
) -> dict[str, CappedCount]:
    """Runs per run state (capped), optionally of one workflow."""
    rows = await _all(
        conn,
        """
        SELECT s.state, (SELECT count(*) FROM (
                   SELECT 1 FROM pgflow.records r
                   WHERE r.run_state = s.state
                     AND (%(w)s::text IS NULL OR r.workflow = %(w)s)
                   LIMIT %(cap)s + 1) x) AS n
        FROM unnest(%(states)s::text[]) AS s(state)
        """,
        {"w": workflow, "cap": cap, "states": list(RUN_STATES)},
    )
    return {r["state"]: _capped(r["n"], cap) for r in rows}


async def status_counts(
    conn: AsyncConnection[Any],
    workflow: str,
    names: Sequence[str],
    *,
    active_only: bool = False,
    cap: int = COUNT_CAP,
) -> dict[str, CappedCount]:
    """Runs of ``workflow`` per status (capped); ``active_only``: runs in progress only."""
    if not names:
        return {}
    # a literal predicate, so the planner can use the partial index of runs in progress
    active = "AND r.run_state IN ('INITIATED', 'RUNNING', 'PAUSED')" if active_only else ""
    rows = await _all(
        conn,
        f"""
        SELECT s.status, (SELECT count(*) FROM (
                   SELECT 1 FROM pgflow.records r
                   WHERE r.workflow = %(w)s AND r.status = s.status {active}
                   LIMIT %(cap)s + 1) x) AS n
        FROM unnest(%(names)s::text[]) AS s(status)
        """,
        {"w": workflow, "cap": cap, "names": list(names)},
    )
    return {r["status"]: _capped(r["n"], cap) for r in rows}


# ----------------------------------------------------------------------- runs
@dataclass(frozen=True, slots=True)
class RunFilter:
    """The Runs page filters (all optional)."""

    workflow: str | None = None
    status: str | None = None
    run_state: str | None = None
    foreign_id_prefix: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def where(self) -> tuple[list[str], dict[str, Any]]:
        clauses: list[str] = []
        params: dict[str, Any] = {}
        if self.workflow:
            clauses.append("r.workflow = %(workflow)s")
            params["workflow"] = self.workflow
        if self.status:
            clauses.append("r.status = %(status)s")
            params["status"] = self.status
        if self.run_state:
            clauses.append("r.run_state = %(run_state)s")
            params["run_state"] = self.run_state
        if self.foreign_id_prefix:
            escaped = (
                self.foreign_id_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            )
            clauses.append("r.foreign_id LIKE %(prefix)s")
            params["prefix"] = escaped + "%"
        if self.created_after:
            clauses.append("r.created_at >= %(after)s")
            params["after"] = self.created_after
        if self.created_before:
            clauses.append("r.created_at < %(before)s")
            params["before"] = self.created_before
        return clauses, params


_RUN_LIST_COLUMNS = (
    "r.run_id, r.workflow, r.foreign_id, r.status, r.run_state, r.err_count, r.created_at,"
    " r.updated_at, r.idle_for"
)


async def runs(
    conn: AsyncConnection[Any],
    flt: RunFilter,
    *,
    limit: int = 50,
    after: str | None = None,
    reason_column: bool = False,
) -> Page:
    """Runs, newest first, keyset-paginated on ``(created_at, run_id)``."""
    key: tuple[datetime, UUID] | None = None
    if after:
        created, run_id = decode_token(after, 2)
        try:
            key = (datetime.fromisoformat(created), UUID(run_id))
        except ValueError:
            raise ValueError("bad page token") from None
        if key[0].tzinfo is None:
            raise ValueError("bad page token")
        # btree does not combine a row comparison with a scalar bound on the same column
        # and may start its scan at the weaker one: keep only the stricter of the two
        if flt.created_before is not None:
            if key[0] < flt.created_before:
                flt = replace(flt, created_before=None)
            else:
                key = None
    clauses, params = flt.where()
    if key is not None:
        clauses.append("(r.created_at, r.run_id) < (%(k_at)s, %(k_id)s)")
        key_at, key_id = key
        params.update(k_at=key_at, k_id=key_id)
    cols = _RUN_LIST_COLUMNS + (", r.run_state_reason" if reason_column else "")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    params["limit"] = limit + 1
    rows = await _all(
        conn,
        f"SELECT {cols} FROM pgflow.runs r {where}"
        " ORDER BY r.created_at DESC, r.run_id DESC LIMIT %(limit)s",
        params,
    )
    token = None
    if len(rows) > limit:
        rows = rows[:limit]
        token = encode_token(rows[-1]["created_at"], rows[-1]["run_id"])
    return Page(rows, token)


async def run(conn: AsyncConnection[Any], run_id: UUID) -> Row | None:
    """One run from ``pgflow.runs`` (every column the installed view has)."""
    return await _one(conn, "SELECT * FROM pgflow.runs WHERE run_id = %s", [run_id])


async def run_history(conn: AsyncConnection[Any], rec: Row, limit: int = 1000) -> list[Row]:
    """Every transition of one run, in order (``pgflow.run_history``), with its reason."""
    return await _all(
        conn,
        "SELECT h.step, h.from_status, h.status, h.change, h.run_state, h.version, h.at,"
        " h.after, h.event_id, h.trace_id, h.headers ->> 'reason' AS reason,"
        " h.headers ->> 'error' AS error"
        " FROM pgflow.run_history h"
        " WHERE h.workflow = %s AND h.foreign_id = %s AND h.run_id = %s"
        " ORDER BY h.step LIMIT %s",
        [rec["workflow"], rec["foreign_id"], rec["run_id"], limit],
    )


async def stuck_runs(
    conn: AsyncConnection[Any], workflow: str | None = None, limit: int = 50
) -> list[Row]:
    """Runs needing a look (``pgflow.stuck_runs``), longest-idle first."""
    return await _all(
        conn,
        "SELECT run_id, workflow, foreign_id, status, run_state, reason, err_count,"
        " last_error, idle_for, next_timer_at, updated_at FROM pgflow.stuck_runs"
        " WHERE (%(w)s::text IS NULL OR workflow = %(w)s)"
        " ORDER BY updated_at LIMIT %(limit)s",
        {"w": workflow, "limit": limit},
    )


# ------------------------------------------------------------------ consumers
#: A consumer shard's events ahead of its position — the predicate of
#: ``pgflow.consumer_lag`` — as two bounded index walks (see pgflow/snapshots.py for
#: positions). ``pos`` is the newest snapshot the position refers to (``upto`` while a
#: diff is being read, else ``snap``):
#:
#: 1. *beyond* — not visible in ``pos``: a walk of ``(stream[, type], tx, id)`` from
#:    ``xmin(pos)``;
#: 2. *rest of the diff* (only while one is being read, and only when walk 1 did not
#:    reach the cap) — visible in ``upto``, not in ``snap``, id above ``after_id``: a
#:    walk of ``(stream[, type], id)`` from ``after_id``. Rows it passes over are beyond
#:    ``upto`` (fewer than the cap, or walk 2 would not run) or, rarely, already read.
#:
#: Each walk's lower bound is a row comparison that includes the index's leading column
#: and its upper bound a ``<=`` on that column — not ``stream = c.stream AND tx >= x``:
#: given an equality too, PostgreSQL 15 starts the scan at the first entry of the stream
#: (or type) and filters its way up (measured 20 ms per far-ahead cursor, not 0.7 ms).
#: Every walk is ordered: a bare ``LIMIT`` let the planner seq-scan from the start of the
#: table, where a cursor near the end finds nothing (measured 7.7 s per page).
_SHARD = "(c.shard_count = 1 OR e.shard_hash %% c.shard_count = c.shard)"
_BEYOND = f"NOT pg_visible_in_snapshot(e.tx, p.pos) AND {_SHARD}"
_DIFF = (
    "pg_visible_in_snapshot(e.tx, c.upto) AND NOT pg_visible_in_snapshot(e.tx, c.snap)"
    f" AND {_SHARD}"
)
_WALK = {
    # (any type: index (stream, tx, id) / (stream, id)), (one type: (stream, type, ...))
    "beyond": (
        "(e.stream, e.tx) >= (c.stream, pg_snapshot_xmin(p.pos)) AND e.stream <= c.stream"
        f" AND {_BEYOND} ORDER BY e.stream, e.tx, e.id",
        "e.stream = c.stream AND (e.type, e.tx) >= (ty.name, pg_snapshot_xmin(p.pos))"
        f" AND e.type <= ty.name AND {_BEYOND} ORDER BY e.type, e.tx, e.id",
    ),
    "diff": (
        "(e.stream, e.id) > (c.stream, c.after_id) AND e.stream <= c.stream"
        f" AND {_DIFF} ORDER BY e.stream, e.id",
        "e.stream = c.stream AND (e.type, e.id) > (ty.name, c.after_id)"
        f" AND e.type <= ty.name AND {_DIFF} ORDER BY e.type, e.id",
    ),
}


def _walk(kind: str, select: str, limit: int) -> str:
    """Rows of walk ``kind`` for cursor ``c`` (types NULL: one walk; else one per type)."""
    any_type, one_type = _WALK[kind]
    return (
        f"(SELECT {select} FROM pgflow.events e WHERE c.types IS NULL AND {any_type}"
        f" LIMIT {limit})"
        f" UNION ALL (SELECT y.* FROM unnest(c.types) AS ty(name) CROSS JOIN LATERAL"
        f" (SELECT {select} FROM pgflow.events e WHERE {one_type} LIMIT {limit}) y)"
    )


async def consumer_lag(conn: AsyncConnection[Any], cap: int = LAG_CAP) -> list[Row]:
    """Per consumer and shard: its position, events ahead (capped) and the oldest one's
    age — the rows of ``pgflow.consumer_lag``, by bounded index walks (above) instead of
    counting every event ahead, so a consumer ten million events behind costs what one
    a thousand behind costs. JIT is off: compiling costs far more than these walks
    (measured 4 ms → 30-185 ms)."""
    lim = int(cap) + 1
    sql = f"""
        SELECT c.consumer, c.shard, c.shard_count, c.stream, c.types, c.updated_at,
               a.n + b.n AS lag_events,
               greatest(coalesce(extract(epoch FROM clock_timestamp()
                                         - least(a.oldest, b.oldest)), 0), 0)
                   ::double precision AS lag_seconds,
               least(a.oldest, b.oldest) AS oldest,
               extract(epoch FROM clock_timestamp() - c.updated_at)::double precision
                   AS cursor_age_seconds
        FROM pgflow.cursors c
        CROSS JOIN LATERAL (SELECT coalesce(c.upto, c.snap) AS pos) p
        CROSS JOIN LATERAL (
            SELECT (SELECT count(*) FROM (SELECT 1 FROM ({_walk("beyond", "1", lim)}) w
                                          LIMIT {lim}) x) AS n,
                   (SELECT min(w.created_at) FROM ({_walk("beyond", "e.created_at", 1)}) w)
                       AS oldest
        ) a
        CROSS JOIN LATERAL (
            SELECT (SELECT count(*) FROM (SELECT 1 FROM ({_walk("diff", "1", lim)}) w
                                          LIMIT {lim}) x) AS n
            WHERE c.upto IS NOT NULL AND a.n < {lim}
            UNION ALL SELECT 0 WHERE NOT (c.upto IS NOT NULL AND a.n < {lim})
        ) bn
        CROSS JOIN LATERAL (
            SELECT bn.n,
                   CASE WHEN bn.n > 0 THEN (SELECT min(w.created_at)
                        FROM ({_walk("diff", "e.created_at", 1)}) w) END AS oldest
        ) b
        ORDER BY c.consumer, c.shard_count, c.shard
        LIMIT 1000
    """
    async with conn.transaction():
        # Only the ordered index walks are bounded; the planner's estimates for a
        # position's snapshot bounds are guesses, and a bitmap scan + sort of a whole
        # stream "looked" cheaper (measured 60 ms per never-moved consumer at 35,000
        # events; seconds at millions). JIT compiling costs more than the walks.
        await conn.execute(
            "SET LOCAL jit = off; SET LOCAL enable_bitmapscan = off;"
            " SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off;"
            " SET LOCAL enable_incremental_sort = off"
        )
        rows = await _all(conn, sql, {})  # {}: "%%" in the text is a literal "%"
    for r in rows:
        r["lag_events"] = min(int(r["lag_events"]), lim)
        r["lag"] = _capped(r["lag_events"], cap)
    return rows


async def horizon(conn: AsyncConnection[Any]) -> Row | None:
    """The oldest transaction holding an xid (``pgflow.horizon``)."""
    return await _one(
        conn,
        "SELECT age_seconds, pid, usename, application_name, state, xact_start, prepared_gid"
        " FROM pgflow.horizon",
    )


# --------------------------------------------------------------- dead letters
async def dead_letters(
    conn: AsyncConnection[Any],
    *,
    pending_only: bool = True,
    consumer: str | None = None,
    limit: int = 50,
    after: str | None = None,
) -> Page:
    """Dead letters, newest first, keyset-paginated on ``id``."""
    clauses: list[str] = []
    params: dict[str, Any] = {"limit": limit + 1}
    if pending_only:
        clauses.append("d.replayed_at IS NULL")
    if consumer:
        clauses.append("d.consumer = %(consumer)s")
        params["consumer"] = consumer
    if after:
        (last,) = decode_token(after, 1)
        if not last.isdigit():
            raise ValueError("bad page token")
        clauses.append("d.id < %(after)s")
        params["after"] = int(last)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await _all(
        conn,
        "SELECT d.id, d.consumer, d.event_id, d.foreign_id, d.type, d.reason, d.attempts,"
        " d.created_at, d.replayed_at, d.headers, d.payload"
        f" FROM pgflow.dead_letters d {where} ORDER BY d.id DESC LIMIT %(limit)s",
        params,
    )
    token = None
    if len(rows) > limit:
        rows = rows[:limit]
        token = encode_token(rows[-1]["id"])
    return Page(rows, token)


async def dead_letter(conn: AsyncConnection[Any], dead_letter_id: int) -> Row | None:
    return await _one(
        conn,
        "SELECT d.id, d.consumer, d.event_id, d.foreign_id, d.type, d.reason, d.attempts,"
        " d.created_at, d.replayed_at, d.headers, d.payload FROM pgflow.dead_letters d"
        " WHERE d.id = %s",
        [dead_letter_id],
    )


# -------------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True)
class ActionResult:
    message: str
    record: Mapping[str, Any] = field(default_factory=dict)


ACTIONS = ("retry", "pause", "resume", "cancel")


async def act_on_run(
    conn: AsyncConnection[Any], run_id: UUID, action: str, reason: str | None
) -> ActionResult:
    """Apply ``action`` to a run through :mod:`pgflow.workflow.actions` (NotFound /
    InvalidTransition propagate with their one-line messages)."""
    from pgflow.errors import NotFound

    rec = await run(conn, run_id)
    if rec is None:
        raise NotFound(f"no run {run_id}")
    wf, fid = rec["workflow"], rec["foreign_id"]
    if action == "pause":
        new = await actions.pause(conn, wf, fid, run_id, reason=reason)
    elif action == "cancel":
        new = await actions.cancel(conn, wf, fid, run_id, reason=reason)
    elif action == "resume":
        new = await actions.resume(conn, wf, fid, run_id)
    elif action == "retry":
        new = await actions.retry(conn, wf, fid, run_id)
    else:
        raise ValueError(f"unknown action {action!r}")
    return ActionResult(
        f"{action}: run {new.run_id} of {fid!r} is now {new.run_state}",
        {"run_state": str(new.run_state), "version": new.version},
    )


async def replay(conn: AsyncConnection[Any], dead_letter_id: int) -> ActionResult:
    """Replay a dead letter exactly as ``pgflow dead-letters --replay ID`` does."""
    return ActionResult(await replay_dead_letter(conn, dead_letter_id))


# ---------------------------------------------------------------------- query
async def query(conn: AsyncConnection[Any], sql: str, *, limit: int = 1000) -> InspectResult:
    """``pgflow inspect`` on ``conn``: validated, read-only, rolled back, time-limited."""
    return await inspect(conn, sql, limit=limit)
