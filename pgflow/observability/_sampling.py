"""Database sampling: consumer lag and the xid horizon, read from Postgres for metrics.

Lag is a property of the database (events after each cursor), not of one process, so a
worker samples ``pgflow.consumer_lag`` periodically (:func:`sample_forever`) and feeds
:data:`~pgflow.observability.metrics` — its gauges and its lag-alert crossings.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pgflow.observability._metrics import metrics
from pgflow.observability._state import logger

if TYPE_CHECKING:  # pragma: no cover
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool


@dataclass(frozen=True, slots=True)
class ConsumerLag:
    """One row of ``pgflow.consumer_lag``."""

    consumer: str
    shard: int
    shard_count: int
    lag_events: int
    lag_seconds: float


_LAG_SQL = (
    "SELECT consumer, shard, shard_count, lag_events, lag_seconds"
    " FROM pgflow.consumer_lag ORDER BY consumer, shard"
)


async def sample_database(
    db: AsyncConnectionPool[Any] | AsyncConnection[Any], *, force: bool = False
) -> list[ConsumerLag]:
    """Read every consumer's lag (``pgflow.consumer_lag``) and the xid horizon age, and
    feed them to :data:`metrics` (gauges, lag-alert crossings).

    Meant to be called by a worker every few seconds (see :func:`sample_forever`).
    Without metrics and without registered lag alerts it does not touch the database
    (unless ``force``) and returns ``[]``.
    """
    if not (force or metrics.enabled or metrics._thresholds):
        return []
    from psycopg import AsyncConnection as _AsyncConnection

    from pgflow.log.streamer import horizon_age

    async def _read(conn: AsyncConnection[Any]) -> tuple[list[ConsumerLag], float]:
        cur = await conn.execute(_LAG_SQL)
        rows = [
            ConsumerLag(str(r[0]), int(r[1]), int(r[2]), int(r[3]), float(r[4]))
            for r in await cur.fetchall()
        ]
        return rows, await horizon_age(conn)

    if isinstance(db, _AsyncConnection):
        rows, horizon = await _read(db)
    else:
        async with db.connection() as conn:
            rows, horizon = await _read(conn)
    seen = set()
    for row in rows:
        seen.add((row.consumer, row.shard))
        metrics.lag(row.consumer, row.shard, row.lag_events, row.lag_seconds)
    with metrics._lock:
        stale = [key for key in metrics._lag if key not in seen]
    for consumer, shard in stale:
        metrics.forget(consumer, shard)
    metrics.horizon_age(horizon)
    return rows


async def sample_forever(
    db: AsyncConnectionPool[Any],
    interval: float = 10.0,
    *,
    sleep: Callable[[float], Awaitable[Any]] | None = None,
) -> None:
    """Call :func:`sample_database` every ``interval`` seconds until cancelled; database
    errors are logged (once per outage) and retried at the next tick."""
    import asyncio

    import psycopg

    pause = sleep or asyncio.sleep
    failing = False
    while True:
        try:
            await sample_database(db)
            if failing:
                logger.info("lag sampling recovered")
            failing = False
        except (psycopg.Error, OSError) as exc:
            if not failing:
                logger.warning("lag sampling failed (%s); will retry", exc)
            failing = True
        await pause(interval)
