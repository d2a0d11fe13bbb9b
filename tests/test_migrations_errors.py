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
from pgflow.cursors import CursorKey, advance_cursor, ensure_cursor, load_cursor
from pgflow.errors import ConfigError, DatabaseUnavailable, SchemaError
from pgflow.events import NewEvent, Position, append
from pgflow.migrations import check_schema, latest_version
from pgflow.streamer import Filter, read_batch
from pgflow.testing import TestDatabases
from tests._util import wait_until

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
    while batch := await read_batch(conn, flt, pos, limit=2):
        out.extend(e.id for e in batch)
        pos = batch[-1].position
    return out


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

    key_mid, key_start = CursorKey("mid"), CursorKey("start")
    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:

        async def all_final() -> list[Any]:
            batch = await read_batch(conn, flt, Position.start())
            return batch if len(batch) == 4 else []

        # (waits while other clients of a shared server hold the xid horizon back)
        everything = await wait_until(all_final, timeout=30, message="events deliverable")
        assert [e.id for e in everything] == [first, a_id, b_id, last]
        # "mid" consumed first and A's event; B's (lower id!) and last are still to do.
        await ensure_cursor(conn, key_mid, flt)
        await ensure_cursor(conn, key_start, flt)
        assert await advance_cursor(conn, key_mid, Position.start(), everything[1].position)
        before = {
            k: await _events_after(conn, flt, await load_cursor(conn, k))
            for k in (key_mid, key_start)
        }
        assert before[key_mid] == [b_id, last]

        # Simulate a restore into a cluster whose xid counter is far behind.
        await conn.execute(
            "UPDATE pgflow.events SET tx = (tx::text::bigint + 1000000000000)::text::xid8"
        )
        await conn.execute(
            "UPDATE pgflow.cursors SET tx = (tx::text::bigint + 1000000000000)::text::xid8"
            " WHERE tx > '0'"
        )

    with pytest.raises(SchemaError) as info:
        await migrate(pgflow_dsn)
    assert "--repair-xid-reset" in _one_line(str(info.value))
    result = _cli("migrate", "--dsn", pgflow_dsn)
    assert result.returncode == 1 and "--repair-xid-reset" in _one_line(result.stderr)

    fixed = _cli("migrate", "--dsn", pgflow_dsn, "--repair-xid-reset")
    assert fixed.returncode == 0, fixed.stderr
    assert await migrate(pgflow_dsn) == []  # no longer detected

    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        after = {
            k: await _events_after(conn, flt, await load_cursor(conn, k))
            for k in (key_mid, key_start)
        }
        # Every cursor still has exactly the same events ahead of it (B is not lost,
        # A is not repeated), and new events come after all of them.
        assert {k: set(v) for k, v in after.items()} == {k: set(v) for k, v in before.items()}
        async with conn.transaction():
            [new] = await append(conn, [NewEvent("s", "t", "new")])

        async def delivered_last() -> bool:
            ahead = await _events_after(conn, flt, await load_cursor(conn, key_mid))
            return ahead[-1] == new and set(ahead) == {b_id, last, new}

        await wait_until(delivered_last, timeout=10, message="new event after the old ones")
