"""Schema migrations: numbered SQL files applied once, in order, under an advisory lock.

``migrations/NNNN_name.sql`` files create and change tables; ``sql/*.sql`` files hold
views and functions that are (re)created with ``CREATE OR REPLACE`` after every
migration run, so they always match the code. Applied versions are recorded in
``pgflow.schema_migrations``. A database migrated by newer code is refused rather than
half-understood.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import AsyncConnection

from pgflow import _db
from pgflow.errors import SchemaError
from pgflow.log.snapshots import CONSUMED, consumed_sql

logger = logging.getLogger(__name__)

#: Advisory lock key held while migrating (two processes never migrate at once).
MIGRATION_LOCK_KEY = 0x7067_666C_6F77  # "pgflow"

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path


def resource_dir(name: str) -> Path:
    """Locate ``migrations/`` or ``sql/``: inside the wheel, else the source checkout."""
    packaged = Path(__file__).resolve().parents[1] / "_resources" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / name


def known_migrations() -> list[Migration]:
    """The numbered migration files, in order.

    Two files with one number (two branches each took "the next free number") would
    apply in an arbitrary order and be recorded as one version: refuse them loudly.
    """
    found: dict[int, Migration] = {}
    for path in sorted(resource_dir("migrations").glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if not match:
            continue
        migration = Migration(int(match[1]), match[2], path)
        if migration.version in found:
            raise SchemaError(
                f"two migrations numbered {migration.version:04d}: "
                f"{found[migration.version].path.name} and {path.name} (renumber one)"
            )
        found[migration.version] = migration
    return [found[v] for v in sorted(found)]


def latest_version() -> int:
    return max((m.version for m in known_migrations()), default=0)


async def applied_versions(conn: AsyncConnection[Any]) -> list[int]:
    """Versions recorded in ``pgflow.schema_migrations`` (empty before the first migrate)."""
    cur = await conn.execute("SELECT to_regclass('pgflow.schema_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return []
    cur = await conn.execute("SELECT version FROM pgflow.schema_migrations ORDER BY version")
    return [int(r[0]) for r in await cur.fetchall()]


async def check_schema(conn: AsyncConnection[Any]) -> None:
    """Raise :class:`SchemaError` unless the schema is exactly what this code expects."""
    versions = await applied_versions(conn)
    newest = latest_version()
    if not versions:
        raise SchemaError("pgflow schema not installed: run `pgflow migrate` first")
    if max(versions) > newest:
        raise SchemaError(
            f"database schema version {max(versions)} is newer than this pgflow "
            f"(knows up to {newest}): upgrade pgflow"
        )
    missing = sorted({m.version for m in known_migrations()} - set(versions))
    if missing:
        # Not only "max < newest": a database migrated by a build that had a later
        # migration but not an earlier one (two branches) lacks the earlier one.
        raise SchemaError(
            f"database schema version {max(versions)} lacks migration(s) "
            f"{', '.join(f'{v:04d}' for v in missing)} of this pgflow: run `pgflow migrate`"
        )


async def migrate(dsn: str | None = None, *, repair_xid_reset: bool = False) -> list[int]:
    """Apply pending migrations and refresh views; return the versions applied now.

    Safe to run concurrently from many processes: an advisory lock serialises them and
    the pending migrations commit together with their ``schema_migrations`` rows.
    """
    dsn = _db.resolve_dsn(dsn)
    conn = await _db.connect(dsn, autocommit=True)
    try:
        return await migrate_connection(conn, repair_xid_reset=repair_xid_reset)
    finally:
        await conn.close()


def _log_pgflow_notice(diag: psycopg.errors.Diagnostic) -> None:
    """Show what the SQL files RAISE for the operator (e.g. no CREATEROLE, so the
    ``pgflow_reader`` role of ``pgflow inspect`` was not created)."""
    message = diag.message_primary or ""
    if message.startswith("pgflow:"):
        logger.warning("%s", message.removeprefix("pgflow:").strip())


async def migrate_connection(
    conn: AsyncConnection[Any], *, repair_xid_reset: bool = False
) -> list[int]:
    """Apply pending migrations on ``conn`` (not inside a transaction).

    Everything happens in one transaction under a *transaction-scoped* advisory lock:
    a session lock would be taken and released on different server sessions behind a
    transaction pooler (pgbouncer), leaking it and blocking every later migrate. One
    transaction also means a failing migration leaves the schema as it was.
    """
    conn.add_notice_handler(_log_pgflow_notice)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            await conn.execute("CREATE SCHEMA IF NOT EXISTS pgflow")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS pgflow.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = set(await applied_versions(conn))
            newest = latest_version()
            if done and max(done) > newest:
                raise SchemaError(
                    f"database schema version {max(done)} is newer than this pgflow "
                    f"(knows up to {newest}): upgrade pgflow instead of migrating"
                )
            applied: list[int] = []
            for migration in known_migrations():
                if migration.version in done:
                    continue
                logger.info("applying migration %04d_%s", migration.version, migration.name)
                await conn.execute(migration.path.read_text())
                await conn.execute(
                    "INSERT INTO pgflow.schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
                applied.append(migration.version)
            for path in sorted(resource_dir("sql").glob("*.sql")):
                await conn.execute(path.read_text())
        async with conn.transaction():  # applied migrations stay, even if this refuses
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            await check_xid_counter(conn, repair=repair_xid_reset)
        return applied
    finally:
        conn.remove_notice_handler(_log_pgflow_notice)


async def check_xid_counter(conn: AsyncConnection[Any], *, repair: bool) -> None:
    """Detect a transaction-id counter that went backwards (dump/restore, new cluster).

    Positions are snapshots and rows carry their writer's transaction id. After a
    restore into a fresh cluster, new transactions get *smaller* ids than the stored
    rows and positions, so stored rows would look "in the future" to every snapshot and
    new ones would look "already read".

    ``repair`` renumbers the stored transaction ids into the range below the server's
    counter while keeping, for every cursor, exactly the same set of events read and
    unread (see :func:`repair_xid_reset`). Run it while no pgflow worker is running.
    """
    cur = await conn.execute(
        "SELECT greatest((SELECT max(tx) FROM pgflow.events), (SELECT max(tx) FROM"
        " pgflow.changes), (SELECT max(greatest(pg_snapshot_xmax(snap),"
        " coalesce(pg_snapshot_xmax(upto), '0'))) FROM pgflow.cursors)"
        ") > pg_current_xact_id()"
    )
    row = await cur.fetchone()
    if not row or not row[0]:
        return
    if not repair:
        raise SchemaError(
            "stored event transaction ids are ahead of this server's xid counter "
            "(was the database restored from a dump?): run `pgflow migrate "
            "--repair-xid-reset` while no pgflow worker is running"
        )
    await repair_xid_reset(conn)
    logger.warning("repaired event/cursor transaction ids after an xid counter reset")




async def repair_xid_reset(conn: AsyncConnection[Any]) -> None:
    """Renumber stored transaction ids to small values, preserving what each cursor read.

    For every event, ``k`` = how many cursors of its stream have read it. The cursors
    of a stream have read nested sets of events (each a snapshot taken at some time),
    so cursor ``c`` has read exactly the events with ``k >= t_c`` for a threshold
    ``t_c``. Events get ``tx = 3 + K - k`` (``K``: the most cursors of any stream) and
    cursor ``c`` the snapshot ``(4 + K - t_c)`` with nothing in progress: it sees as
    read exactly what it had read. A cursor in the middle of a diff whose read set is
    not nested with its stream's others is refused with its name (run the workers on
    the old server until it has finished, or delete the cursor row to re-read).

    Connector cursors over other tables (``stream`` NULL: ``pgflow.changes``, app
    tables) cannot be renumbered from here: they are refused unless still at the start.
    Rows of ``pgflow.changes`` are then all given ``tx = 3`` (visible to every new
    snapshot, unread by every cursor at the start).
    """
    async with conn.transaction():
        await conn.execute(
            "LOCK TABLE pgflow.events, pgflow.cursors, pgflow.changes IN EXCLUSIVE MODE"
        )
        cur = await conn.execute(
            "SELECT consumer FROM pgflow.cursors WHERE stream IS NULL"
            " AND (snap::text <> '1:1:' OR upto IS NOT NULL) ORDER BY consumer LIMIT 1"
        )
        row = await cur.fetchone()
        if row:
            raise SchemaError(
                f"cannot repair the xid reset: connector cursor {row[0]!r} reads a table"
                " other than pgflow.events (its position names that table's transaction"
                " ids); delete its row in pgflow.cursors to re-read the source from the"
                " start, or reset it by hand, then run the repair again"
            )
        await conn.execute(
            "CREATE TEMP TABLE pgflow_xid_k ON COMMIT DROP AS"
            " SELECT e.id, (SELECT count(*) FROM pgflow.cursors c WHERE c.stream = e.stream"
            f" AND {CONSUMED}) AS k FROM pgflow.events e"
        )
        await conn.execute("CREATE INDEX ON pgflow_xid_k (id)")
        await conn.execute(
            "CREATE TEMP TABLE pgflow_xid_t ON COMMIT DROP AS"
            " SELECT c.consumer, c.shard, c.shard_count, coalesce(("
            "   SELECT min(x.k) FROM pgflow.events e JOIN pgflow_xid_k x ON x.id = e.id"
            f"  WHERE e.stream = c.stream AND {CONSUMED}), 1000000000) AS t,"
            " EXISTS (SELECT 1 FROM pgflow.events e JOIN pgflow_xid_k x ON x.id = e.id"
            f"  WHERE e.stream = c.stream AND NOT {CONSUMED} AND x.k >= ("
            "   SELECT min(x2.k) FROM pgflow.events e2 JOIN pgflow_xid_k x2 ON x2.id = e2.id"
            "   WHERE e2.stream = c.stream AND"
            f"  {consumed_sql('e2')})) AS tangled"
            " FROM pgflow.cursors c WHERE c.stream IS NOT NULL"
        )
        cur = await conn.execute(
            "SELECT consumer, shard, shard_count FROM pgflow_xid_t WHERE tangled LIMIT 1"
        )
        row = await cur.fetchone()
        if row:
            raise SchemaError(
                f"cannot repair the xid reset: cursor {row[0]!r} (shard {row[1]} of"
                f" {row[2]}) stopped in the middle of a batch that overlaps other"
                " cursors of its stream; delete its row in pgflow.cursors to re-read"
                " its stream, then run the repair again"
            )
        cur = await conn.execute("SELECT coalesce(max(k), 0) FROM pgflow_xid_k")
        row = await cur.fetchone()
        most = int(row[0]) if row else 0
        cur = await conn.execute(
            "SELECT %s::bigint + 5 < pg_current_xact_id()::text::bigint", (most,)
        )
        row = await cur.fetchone()
        if not row or not row[0]:
            raise SchemaError(
                "cannot repair the xid reset: more consumer cursors than transaction ids "
                "used by this server so far"
            )
        await conn.execute(
            "UPDATE pgflow.cursors c SET snap = (s.x::text || ':' || s.x::text || ':')"
            "::pg_snapshot, upto = NULL, after_id = 0, lo = NULL, hi = NULL"
            " FROM (SELECT consumer, shard, shard_count, 4 + %(most)s - least(t, %(most)s + 1)"
            "  AS x FROM pgflow_xid_t) s"
            " WHERE (c.consumer, c.shard, c.shard_count) = (s.consumer, s.shard, s.shard_count)",
            {"most": most},
        )
        await conn.execute(
            "UPDATE pgflow.events e SET tx = (3 + %s - x.k)::text::xid8"
            " FROM pgflow_xid_k x WHERE x.id = e.id",
            (most,),
        )
        await conn.execute("UPDATE pgflow.changes SET tx = '3'::xid8")
        # Cursors of streams with no events yet, and connector cursors at the start.
        await conn.execute(
            "UPDATE pgflow.cursors SET snap = '1:1:', upto = NULL, after_id = 0"
            " WHERE stream IS NULL"
        )


__all__ = [
    "Migration",
    "check_schema",
    "check_xid_counter",
    "latest_version",
    "migrate",
    "migrate_connection",
    "repair_xid_reset",
]
