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

from psycopg import AsyncConnection

from . import _db
from .errors import SchemaError

logger = logging.getLogger("pgflow.migrate")

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
    packaged = Path(__file__).parent / "_resources" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / name


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
    if max(versions) < newest:
        raise SchemaError(
            f"database schema version {max(versions)} is older than this pgflow "
            f"({newest}): run `pgflow migrate`"
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


async def migrate_connection(
    conn: AsyncConnection[Any], *, repair_xid_reset: bool = False
) -> list[int]:
    """Apply pending migrations on ``conn`` (not inside a transaction).

    Everything happens in one transaction under a *transaction-scoped* advisory lock:
    a session lock would be taken and released on different server sessions behind a
    transaction pooler (pgbouncer), leaking it and blocking every later migrate. One
    transaction also means a failing migration leaves the schema as it was.
    """
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


async def check_xid_counter(conn: AsyncConnection[Any], *, repair: bool) -> None:
    """Detect a transaction-id counter that went backwards (dump/restore, new cluster).

    Events and cursors are ordered by the writer's transaction id. After a restore into
    a fresh cluster, new transactions get *smaller* ids than the stored events, so new
    events would sort before existing cursors and never be delivered.

    ``repair`` renumbers the stored transaction ids into the range below the server's
    counter while keeping, for every cursor, exactly the same set of events before and
    after it (see :func:`repair_xid_reset`). Run it while no pgflow worker is running.
    """
    cur = await conn.execute(
        "SELECT greatest((SELECT max(tx) FROM pgflow.events),"
        " (SELECT max(tx) FROM pgflow.cursors)) >= pg_current_xact_id()"
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
    """Renumber ``tx`` of stored events and cursors to small values, preserving delivery.

    Only the order relative to cursors matters: a cursor must keep seeing the same
    events as "done" and the same ones as "to do". (Setting every ``tx`` to one value
    is NOT enough: ``(tx, id)`` order differs from id order, so a cursor would then skip
    an undelivered event with a lower id, or repeat a delivered one with a higher id.)

    With the distinct cursor positions ``p1 < p2 < … < pm``, the events between
    ``p(k-1)`` and ``pk`` get ``tx = k`` (after ``pm``: ``m + 1``), and cursor ``pk``
    becomes ``(k, largest id of the events now at tx k)``. Within one new ``tx`` the
    events keep their id order. Everything stays below the server's counter, so new
    events sort after all of it.
    """
    async with conn.transaction():
        await conn.execute("LOCK TABLE pgflow.events, pgflow.cursors IN EXCLUSIVE MODE")
        await conn.execute(
            "CREATE TEMP TABLE pgflow_xid_marks ON COMMIT DROP AS"
            " SELECT row_number() OVER (ORDER BY tx, id) AS k, tx, id FROM"
            " (SELECT DISTINCT tx, id FROM pgflow.cursors WHERE (tx, id) > ('0'::xid8, 0)) c"
        )
        cur = await conn.execute(
            "SELECT count(*) + 1 < pg_current_xact_id()::text::bigint FROM pgflow_xid_marks"
        )
        row = await cur.fetchone()
        if not row or not row[0]:
            raise SchemaError(
                "cannot repair the xid reset: more consumer cursors than transaction ids "
                "used by this server so far"
            )
        # New tx of an event: 1 + the number of cursor positions strictly before it.
        await conn.execute(
            "CREATE TEMP TABLE pgflow_xid_map ON COMMIT DROP AS"
            " SELECT e.id, 1 + (SELECT count(*) FROM pgflow_xid_marks m"
            "   WHERE (m.tx, m.id) < (e.tx, e.id)) AS k"
            " FROM pgflow.events e"
        )
        await conn.execute(
            "UPDATE pgflow.cursors c SET tx = m.k::text::xid8, id = coalesce("
            " (SELECT max(x.id) FROM pgflow_xid_map x WHERE x.k = m.k), 0)"
            " FROM pgflow_xid_marks m WHERE (c.tx, c.id) = (m.tx, m.id)"
        )
        await conn.execute(
            "UPDATE pgflow.events e SET tx = x.k::text::xid8"
            " FROM pgflow_xid_map x WHERE x.id = e.id"
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
