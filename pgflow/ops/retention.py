"""Retention: delete old events nobody needs any more (``pgflow prune``).

``pgflow.events`` is append-only and grows forever unless pruned. Pruning must never
delete something a reader still needs, so an event is deleted only when ALL of these
hold (checked inside each DELETE statement, never from an earlier read):

1. **Old**: ``created_at < now() - older_than`` (``now()`` of the database, taken
   once at the start, so every batch uses the same cutoff).
2. (Rule 2 of 0.1, "below the xid horizon", is gone: rule 3 implies the event is
   committed and inside every cursor's snapshot.)
3. **Consumed**: read by EVERY cursor of the event's stream (``pgflow.cursors.stream``):
   visible in the cursor's snapshot, or taken from the diff it is reading (see
   :mod:`pgflow.log.snapshots`). Cursors with another stream, or none (connector cursors
   over other tables), say nothing about this stream. Shard and type filters are
   ignored on purpose: the event must be behind the slowest cursor of the stream,
   which is stricter than (and so as safe as) checking only the cursors whose filter
   matches it. Cursors only move forwards, so an event read by all of them stays read;
   idle consumers move their snapshot forwards every few seconds, so a step that no run
   reaches does not hold its stream back.
   A stream with **no cursor at all is kept** (nothing is pruned): a consumer may be
   deployed later and start from the beginning. ``include_unconsumed=True``
   (``--include-unconsumed``) prunes such streams by age alone.
4. **Run finished**: an event of a workflow run (``run_id`` set and the record
   exists) is deleted only when the run is ``COMPLETED``, ``CANCELLED`` or
   ``DATA_DELETED``; the history of runs in progress (and of runs whose erasure was
   requested but is not done) is kept. Events whose record no longer exists are
   prunable.

Consequences, by design:

* **Pruned runs lose their history**: ``pgflow.run_history`` is built from the event
  log, so a finished run older than the cutoff shows no steps (its record stays in
  ``pgflow.runs``), and ``Workflow.wait_for`` on such a run can no longer tell that it
  passed an earlier status.
* Stale cursor rows (a consumer that was removed, an old ``shard_count`` layout) hold
  their stream back forever — delete those rows to let pruning proceed;
  ``pgflow.consumer_lag`` shows them.
* Readers that keep their own position (:func:`pgflow.log.streamer.stream` with
  ``after=``) are not protected: they have no cursor row.
* A consumer created after a prune starts from the oldest event still retained.

Deletion runs in batches, each its own short transaction (a long DELETE would hold an
xid open, holding back VACUUM for the whole cluster). Batches walk the log in
id order through the primary key and stop at the first batch with nothing older than
the cutoff; id order is close to, not exactly, time order, so an old event behind a
batch of young ones waits for a later prune (never deleted too early, at worst later).

Change-log rows (``pgflow.changes``, written by :func:`pgflow.connectors.capture`) older than the
cutoff go once every connector cursor reading the change log (``pgflow.cursors.source
= 'pgflow.changes'``) has read them; with no such cursor they are kept unless
``include_unconsumed``. They are walked like events (same windows, same early stop).

Also pruned, older than the same cutoff: ``pgflow.timeouts`` rows that are completed
(fired) — only when their run is no longer in progress, since a live run's completed
row is what stops the same timer being armed twice — and ``pgflow.dead_letters`` that
were replayed before the cutoff. Pending dead letters are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from pgflow import _db
from pgflow.log.snapshots import CONSUMED

__all__ = ["PruneResult", "prune"]

#: Run states whose events may be pruned (the run will not move again).
_FINISHED = ("COMPLETED", "CANCELLED", "DATA_DELETED")

# Rules 1-4 for an event row `e`; %(cutoff)s and %(include_unconsumed)s are parameters.
_ELIGIBLE = """
    e.created_at < %(cutoff)s
    AND NOT EXISTS (
        SELECT 1 FROM pgflow.cursors c
        WHERE c.stream = e.stream AND NOT """ + CONSUMED + """)
    AND (%(include_unconsumed)s OR EXISTS (
        SELECT 1 FROM pgflow.cursors c WHERE c.stream = e.stream))
    AND NOT EXISTS (
        SELECT 1 FROM pgflow.records r
        WHERE r.run_id = e.run_id AND r.run_state <> ALL (%(finished)s::text[]))
"""

_TIMEOUTS = """
    t.completed AND t.created_at < %(cutoff)s AND t.expire_at < %(cutoff)s
    AND NOT EXISTS (
        SELECT 1 FROM pgflow.records r
        WHERE r.run_id = t.run_id AND r.run_state <> ALL (%(finished)s::text[]))
"""
_DELETE_TIMEOUTS = (
    "DELETE FROM pgflow.timeouts WHERE id IN (SELECT t.id FROM pgflow.timeouts t WHERE "
    + _TIMEOUTS
    + " LIMIT %(batch)s)"
)
_COUNT_TIMEOUTS = "SELECT count(*) FROM pgflow.timeouts t WHERE " + _TIMEOUTS

_DEAD = "d.replayed_at IS NOT NULL AND d.replayed_at < %(cutoff)s"
_DELETE_DEAD = (
    "DELETE FROM pgflow.dead_letters WHERE id IN (SELECT d.id FROM pgflow.dead_letters d"
    " WHERE " + _DEAD + " LIMIT %(batch)s)"
)
_COUNT_DEAD = "SELECT count(*) FROM pgflow.dead_letters d WHERE " + _DEAD

# Rows of the change log (pgflow.changes) as `e`: old, and read by every connector
# cursor whose source is the change log (kept when there is none, unless
# include_unconsumed) — the same rules as events, with the change log as the stream.
_CHANGES = """
    e.created_at < %(cutoff)s
    AND NOT EXISTS (
        SELECT 1 FROM pgflow.cursors c
        WHERE c.source = 'pgflow.changes' AND NOT """ + CONSUMED + """)
    AND (%(include_unconsumed)s OR EXISTS (
        SELECT 1 FROM pgflow.cursors c WHERE c.source = 'pgflow.changes'))
"""


@dataclass(frozen=True, slots=True)
class _Walk:
    """An id-ordered walk of a log table, deleting (or counting) its eligible rows one
    window at a time, grouped by ``group`` (events by stream, changes by table)."""

    table: str
    eligible: str  #: SQL over `e`
    group: str

    @property
    def window(self) -> str:
        """The next window: its last id and whether anything in it is old."""
        return (
            "SELECT w.id, bool_or(w.old) OVER () FROM ("
            f" SELECT e.id, e.created_at < %(cutoff)s AS old FROM {self.table} e"
            " WHERE e.id > %(id)s::bigint ORDER BY e.id LIMIT %(batch)s"
            ") w ORDER BY w.id DESC LIMIT 1"
        )

    def rows(self, dry_run: bool) -> str:
        """Count (dry run) or delete the window's eligible rows, per group."""
        where = f"e.id > %(id)s::bigint AND e.id <= %(hi_id)s::bigint AND {self.eligible}"
        if dry_run:
            return (
                f"SELECT e.{self.group}, count(*) FROM {self.table} e WHERE {where}"
                f" GROUP BY e.{self.group}"
            )
        return (
            f"WITH gone AS (DELETE FROM {self.table} e WHERE {where} RETURNING e.{self.group}"
            f" AS g) SELECT g, count(*) FROM gone GROUP BY g"
        )


_EVENTS = _Walk("pgflow.events", _ELIGIBLE, "stream")
_CHANGE_LOG = _Walk("pgflow.changes", _CHANGES, "table_name")


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What :func:`prune` deleted (or, with ``dry_run``, would delete)."""

    cutoff: datetime  #: rows older than this (database clock) were considered
    dry_run: bool
    events_by_stream: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    dead_letters: int = 0
    batches: int = 0  #: DELETE transactions run (0 for a dry run)
    changes: int = 0  #: rows of the change log (pgflow.changes)

    @property
    def events(self) -> int:
        return sum(self.events_by_stream.values())


async def prune(
    conn_or_dsn: AsyncConnection[Any] | str | None,
    *,
    older_than: timedelta,
    dry_run: bool = False,
    batch: int = 10_000,
    include_unconsumed: bool = False,
) -> PruneResult:
    """Delete events, fired timeouts and replayed dead letters older than ``older_than``
    that nothing needs any more (the rules are in the module doc).

    Commits after every batch, so a connection must not be inside a transaction
    (``None`` or a DSN opens a connection of its own). ``dry_run`` only counts.
    """
    if older_than <= timedelta(0):
        raise ValueError("older_than must be positive")
    if batch < 1:
        raise ValueError("batch must be at least 1")
    if isinstance(conn_or_dsn, AsyncConnection):
        return await _prune(conn_or_dsn, older_than, dry_run, batch, include_unconsumed)
    conn = await _db.connect(_db.resolve_dsn(conn_or_dsn), autocommit=True)
    try:
        return await _prune(conn, older_than, dry_run, batch, include_unconsumed)
    finally:
        await conn.close()


async def _prune(
    conn: AsyncConnection[Any],
    older_than: timedelta,
    dry_run: bool,
    batch: int,
    include_unconsumed: bool,
) -> PruneResult:
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise ValueError(
            "prune commits after every batch: pass a connection that is not inside a "
            "transaction (or a DSN)"
        )
    async with conn.transaction():
        cur = await conn.execute("SELECT now() - %s::interval", (older_than,))
        row = await cur.fetchone()
    assert row is not None
    cutoff: datetime = row[0]
    params: dict[str, Any] = {
        "cutoff": cutoff,
        "include_unconsumed": include_unconsumed,
        "finished": list(_FINISHED),
        "batch": batch,
    }
    by_stream, event_batches = await _walk(conn, params, dry_run, _EVENTS)
    timeouts = await _prune_table(conn, params, dry_run, _COUNT_TIMEOUTS, _DELETE_TIMEOUTS)
    dead = await _prune_table(conn, params, dry_run, _COUNT_DEAD, _DELETE_DEAD)
    by_table, change_batches = await _walk(conn, params, dry_run, _CHANGE_LOG)
    return PruneResult(
        cutoff=cutoff,
        dry_run=dry_run,
        events_by_stream=by_stream,
        timeouts=timeouts,
        dead_letters=dead,
        batches=event_batches + change_batches,
        changes=sum(by_table.values()),
    )


async def _walk(
    conn: AsyncConnection[Any], params: dict[str, Any], dry_run: bool, walk: _Walk
) -> tuple[dict[str, int], int]:
    """Run ``walk`` from the start of its table: (rows per group, DELETE batches)."""
    params = {**params, "id": 0}
    by_group: dict[str, int] = {}
    batches = 0
    while True:
        # Each statement in its own transaction: no xid is held between batches.
        async with conn.transaction():
            cur = await conn.execute(walk.window, params)
            window = await cur.fetchone()
        if window is None:
            break  # nothing (more)
        hi_id, any_old = window
        if not any_old:
            break  # the walk reached young rows: the rest is younger still
        params.update(hi_id=hi_id)
        async with conn.transaction():
            cur = await conn.execute(walk.rows(dry_run), params)
            for group, count in await cur.fetchall():
                by_group[group] = by_group.get(group, 0) + int(count)
        batches += 0 if dry_run else 1
        params.update(id=hi_id)
    return dict(sorted(by_group.items())), batches


async def _prune_table(
    conn: AsyncConnection[Any], params: dict[str, Any], dry_run: bool, count: str, delete: str
) -> int:
    """Count (dry run) or delete in batches of ``params["batch"]``, one transaction each."""
    if dry_run:
        async with conn.transaction():
            cur = await conn.execute(count, params)
            row = await cur.fetchone()
        return int(row[0]) if row else 0
    total = 0
    while True:
        async with conn.transaction():
            cur = await conn.execute(delete, params)
        total += cur.rowcount
        if cur.rowcount < params["batch"]:
            return total
