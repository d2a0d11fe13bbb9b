"""Migrations and bad input: one-line errors, idempotent and concurrent migrate, the
xid-reset detection and its repair, and the ``pgflow migrate`` command."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection, sql

from pgflow import migrate
from pgflow.errors import ConfigError, DatabaseUnavailable, SchemaError
from pgflow.log.cursors import CursorKey, advance_cursor, ensure_cursor, load_cursor
from pgflow.log.events import NewEvent, Position, append
from pgflow.log.streamer import Filter, read_batch
from pgflow.ops.migrations import check_schema, latest_version
from pgflow.testing import TestDatabases

PGFLOW = Path(sys.executable).parent / "pgflow"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/postgres"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PGFLOW_DATABASE_URL", "DATABASE_URL")}
    return subprocess.run(
        [str(PGFLOW), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def empty_dsn(pgflow_server: TestDatabases) -> Iterator[str]:
    """A database without the pgflow schema."""
    name = f"pgflow_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pgflow_server.server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield pgflow_server.dsn_for(name)
    finally:
        with psycopg.connect(pgflow_server.server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.parametrize(
    ("dsn", "error", "fragment"),
    [
        ("not a dsn", ConfigError, "malformed DSN"),
        ("postgresql://127.0.0.1:notaport/x", ConfigError, "port"),
        (UNREACHABLE, DatabaseUnavailable, "cannot connect"),
    ],
)
async def test_bad_dsn_gives_one_clear_line(
    dsn: str, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error) as info:
        await migrate(dsn)
    assert fragment in _one_line(str(info.value))


async def test_password_is_not_echoed() -> None:
    with pytest.raises(DatabaseUnavailable) as info:
        await migrate("postgresql://postgres:s3cret@127.0.0.1:1/postgres")
    assert "s3cret" not in str(info.value)


async def test_migrate_is_idempotent_and_safe_concurrently(empty_dsn: str) -> None:
    with pytest.raises(SchemaError, match="pgflow migrate"):
        async with await AsyncConnection.connect(empty_dsn) as conn:
            await check_schema(conn)
    first, second = await asyncio.gather(migrate(empty_dsn), migrate(empty_dsn))
    applied = sorted([first, second], key=len)
    assert applied[0] == [] and applied[1][-1] == latest_version()
    assert await migrate(empty_dsn) == []
    async with await AsyncConnection.connect(empty_dsn) as conn:
        await check_schema(conn)
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT version) FROM pgflow.schema_migrations"
        )
        total, distinct = await cur.fetchone() or (0, 0)
        assert total == distinct == len(applied[1])


async def test_schema_newer_than_code(pgflow_dsn: str) -> None:
    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO pgflow.schema_migrations (version, name) VALUES (9999, 'future')"
        )
        with pytest.raises(SchemaError) as info:
            await check_schema(conn)
        assert "newer" in _one_line(str(info.value))
    with pytest.raises(SchemaError) as info:
        await migrate(pgflow_dsn)
    assert "upgrade pgflow" in _one_line(str(info.value))
    result = _cli("migrate", "--dsn", pgflow_dsn)
    assert result.returncode == 1
    assert _one_line(result.stderr).startswith("pgflow: error: database schema version 9999")


def test_cli_migrate(empty_dsn: str) -> None:
    bad = _cli("migrate", "--dsn", "not a dsn")
    assert bad.returncode == 1 and "malformed DSN" in _one_line(bad.stderr)
    down = _cli("migrate", "--dsn", UNREACHABLE)
    assert down.returncode == 1 and "cannot connect" in _one_line(down.stderr)
    missing = _cli("migrate")
    assert missing.returncode == 1 and "PGFLOW_DATABASE_URL" in _one_line(missing.stderr)
    ok = _cli("migrate", "--dsn", empty_dsn)
    assert ok.returncode == 0, ok.stderr
    assert "applied migrations" in ok.stdout
    again = _cli("migrate", "--dsn", empty_dsn)
    assert again.returncode == 0 and "up to date" in again.stdout


async def _events_after(conn: AsyncConnection[Any], flt: Filter, pos: Position) -> list[int]:
    out: list[int] = []
    while (batch := await read_batch(conn, flt, pos, limit=2)).position:
        out.extend(e.id for e in batch.events)
        pos = batch.position
    return out


def _shifted(column: str, offset: int) -> str:
    """SQL: the snapshot in ``column`` with every xid moved up by ``offset``."""
    return (
        f"((pg_snapshot_xmin({column})::text::bigint + {offset})::text || ':' ||"
        f" (pg_snapshot_xmax({column})::text::bigint + {offset})::text || ':' ||"
        f" coalesce((SELECT string_agg((x::text::bigint + {offset})::text, ',')"
        f" FROM pg_snapshot_xip({column}) x), ''))::pg_snapshot"
    )


async def _simulate_restore(conn: AsyncConnection[Any], offset: int = 1_000_000_000_000) -> None:
    """What a restore into a cluster whose xid counter is far behind looks like."""
    await conn.execute(f"UPDATE pgflow.events SET tx = (tx::text::bigint + {offset})::text::xid8")
    await conn.execute(
        "UPDATE pgflow.cursors SET"
        f" snap = CASE WHEN snap::text = '1:1:' THEN snap ELSE {_shifted('snap', offset)} END,"
        f" upto = CASE WHEN upto IS NULL THEN NULL ELSE {_shifted('upto', offset)} END"
    )


async def test_xid_reset_detected_and_repaired(pgflow_dsn: str) -> None:
    flt = Filter("s")
    a = await AsyncConnection.connect(pgflow_dsn)
    b = await AsyncConnection.connect(pgflow_dsn)
    try:
        # Make (tx, id) order differ from id order: A takes its xid first, B inserts
        # and commits, then A inserts (a higher id, but an older tx).
        [first] = await append(b, [NewEvent("s", "t", "first")])
        await b.commit()
        await a.execute("SELECT pg_current_xact_id()")
        [b_id] = await append(b, [NewEvent("s", "t", "b")])
        await b.commit()
        [a_id] = await append(a, [NewEvent("s", "t", "a")])
        await a.commit()
        [last] = await append(b, [NewEvent("s", "t", "last")])
        await b.commit()
    finally:
        await a.close()
        await b.close()
    assert a_id > b_id

    keys = [CursorKey("mid"), CursorKey("start"), CursorKey("done"), CursorKey("one")]
    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        everything = await read_batch(conn, flt, Position.start())
        assert [e.id for e in everything.events] == [first, b_id, a_id, last]
        for key in keys:
            await ensure_cursor(conn, key, flt)
        # "mid" stopped inside a diff, "one" after a diff, "done" at the end.
        two = await read_batch(conn, flt, Position.start(), limit=2)
        assert await advance_cursor(conn, keys[0], Position.start(), two.positions[-1])
        assert await advance_cursor(conn, keys[2], Position.start(), everything.positions[-1])
        assert await advance_cursor(conn, keys[3], Position.start(), everything.positions[0])
        before = {k: await _events_after(conn, flt, await load_cursor(conn, k)) for k in keys}
        assert before[keys[0]] == [a_id, last]
        assert before[keys[2]] == []
        await _simulate_restore(conn)

    with pytest.raises(SchemaError) as info:
        await migrate(pgflow_dsn)
    assert "--repair-xid-reset" in _one_line(str(info.value))
    result = _cli("migrate", "--dsn", pgflow_dsn)
    assert result.returncode == 1 and "--repair-xid-reset" in _one_line(result.stderr)

    fixed = _cli("migrate", "--dsn", pgflow_dsn, "--repair-xid-reset")
    assert fixed.returncode == 0, fixed.stderr
    assert await migrate(pgflow_dsn) == []  # no longer detected

    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        after = {k: await _events_after(conn, flt, await load_cursor(conn, k)) for k in keys}
        # Every cursor still has exactly the same events ahead of it (nothing lost,
        # nothing repeated), and new events come after all of them.
        assert {k: set(v) for k, v in after.items()} == {k: set(v) for k, v in before.items()}
        async with conn.transaction():
            [new] = await append(conn, [NewEvent("s", "t", "new")])
        for key in keys:
            ahead = await _events_after(conn, flt, await load_cursor(conn, key))
            assert set(ahead) == set(before[key]) | {new}, key
            assert ahead[-1] == new


async def test_xid_reset_repair_refuses_connector_cursors_it_cannot_renumber(
    pgflow_dsn: str,
) -> None:
    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await append(conn, [NewEvent("s", "t", "x")])
        await conn.execute(
            "INSERT INTO pgflow.cursors (consumer, shard, shard_count, snap)"
            " VALUES ('connector:app.t:c', 0, 1, pg_current_snapshot())"
        )
        await _simulate_restore(conn)
    result = _cli("migrate", "--dsn", pgflow_dsn, "--repair-xid-reset")
    assert result.returncode == 1
    assert "connector:app.t:c" in _one_line(result.stderr)


async def test_a_missing_earlier_migration_is_noticed(pgflow_dsn: str) -> None:
    """Two branches, two numbers: a database migrated by a build that had 0005 but not
    0004 is not "current" just because its highest version is."""
    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM pgflow.schema_migrations WHERE version = 4")
        with pytest.raises(SchemaError, match="0004"):
            await check_schema(conn)
