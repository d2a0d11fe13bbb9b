"""The Consumers page's queries: lag per consumer shard, and the oldest open transaction.

Lag is counted by bounded index walks, at most ``LAG_CAP + 1`` events ahead of each
cursor, so a consumer ten million events behind costs what one a thousand behind costs.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from pgflow.ui._paging import Row, capped, fetch_all, fetch_one

__all__ = ["LAG_CAP", "consumer_lag", "horizon"]

#: cap of the events-behind count per consumer shard ("1,000+"): counting walks the
#: events index and fetches rows to check the shard, so a far-behind consumer of a rare
#: type costs one fetch per event counted (a 10,000 cap measured 0.5-1.2 s per page)
LAG_CAP = 1_000

#: A consumer shard's events ahead of its position — the predicate of
#: ``pgflow.consumer_lag`` — as two bounded index walks (see pgflow/log/snapshots.py for
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
        rows = await fetch_all(conn, sql, {})  # {}: "%%" in the text is a literal "%"
    for r in rows:
        r["lag_events"] = min(int(r["lag_events"]), lim)
        r["lag"] = capped(r["lag_events"], cap)
    return rows


async def horizon(conn: AsyncConnection[Any]) -> Row | None:
    """The oldest transaction holding an xid (``pgflow.horizon``)."""
    return await fetch_one(
        conn,
        "SELECT age_seconds, pid, usename, application_name, state, xact_start, prepared_gid"
        " FROM pgflow.horizon",
    )
