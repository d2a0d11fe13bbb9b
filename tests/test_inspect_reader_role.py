"""The ``pgflow_reader`` role: created race-free by concurrent migrations of many
databases (roles are cluster-wide, databases and their advisory locks are not), and
skipped without error by a migrating role that lacks CREATEROLE.

The tests run the real ``sql/zz_reader.sql`` with the role renamed to a name unique to
the test, so they never touch the shared ``pgflow_reader`` other test runs use.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from pgflow.ops.migrations import resource_dir
from pgflow.testing import TestDatabases


def _reader_sql(role: str) -> str:
    text = (resource_dir("sql") / "zz_reader.sql").read_text()
    return text.replace("pgflow_reader", role)


@pytest.fixture
def role_name(pgflow_server: TestDatabases) -> Iterator[str]:
    name = f"pgflow_reader_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pgflow_server.server, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
        if exists:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_concurrent_migrations_of_many_databases_create_the_role_once(
    pgflow_server: TestDatabases, role_name: str
) -> None:
    dsns = [pgflow_server.create() for _ in range(4)]
    barrier = threading.Barrier(len(dsns))
    errors: list[BaseException] = []
    script = _reader_sql(role_name)

    def migrate_one(dsn: str) -> None:
        try:
            with psycopg.connect(dsn) as conn:
                barrier.wait(timeout=30)
                conn.execute(script)
                # Keep the transaction (and an uncommitted CREATE ROLE) open a moment,
                # so the others really meet it on pg_authid's unique index.
                conn.execute("SELECT pg_sleep(0.2)")
                conn.commit()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate_one, args=(d,)) for d in dsns]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        for dsn in dsns:
            with psycopg.connect(dsn) as conn:
                row = conn.execute(
                    "SELECT has_table_privilege(%s, 'pgflow.runs', 'SELECT'),"
                    " has_table_privilege(%s, 'pgflow.events', 'SELECT'),"
                    " has_schema_privilege(%s, 'pgflow', 'USAGE')",
                    (role_name, role_name, role_name),
                ).fetchone()
                assert row == (True, False, True)  # views yes, tables no
                # Idempotent: running it again changes nothing and raises nothing.
                conn.execute(script)
    finally:
        for dsn in dsns:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role_name)))
            pgflow_server.drop(dsn)


def test_a_migrating_role_without_createrole_skips_it(pgflow_dsn: str, role_name: str) -> None:
    weak = f"pgflow_weak_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(weak)))
        try:
            notices: list[str] = []
            conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(weak)))
                # Only the role-creating block: the rest needs the schema's owner.
                script = _reader_sql(role_name)
                conn.execute(script[script.index("DO $$") : script.index("END\n$$;") + 7])
            assert any("not created" in n for n in notices)
            row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role_name,))
            assert row.fetchone() is None
        finally:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(weak)))


def test_after_every_migrate_the_reader_reads_every_view_and_no_table(pgflow_dsn: str) -> None:
    from pgflow.ops.migrations import migrate
    from pgflow.testing import run_sync

    run_sync(migrate(pgflow_dsn))  # views are re-created; grants must follow
    with psycopg.connect(pgflow_dsn) as conn:
        rows = conn.execute(
            "SELECT c.relkind, c.relname, has_table_privilege('pgflow_reader', c.oid, 'SELECT')"
            " FROM pg_class c WHERE c.relnamespace = 'pgflow'::regnamespace"
            " AND c.relkind IN ('r', 'p', 'v', 'm', 'S')"
        ).fetchall()
        attrs = conn.execute(
            "SELECT rolcanlogin, rolsuper, rolreplication, rolbypassrls, rolcreaterole"
            " FROM pg_roles WHERE rolname = 'pgflow_reader'"
        ).fetchone()
    views = {name for kind, name, _ in rows if kind in ("v", "m")}
    assert {"runs", "run_history", "horizon", "consumer_lag", "stuck_runs"} <= views
    assert all(ok for kind, _, ok in rows if kind in ("v", "m"))
    assert not any(ok for kind, _, ok in rows if kind not in ("v", "m"))
    assert attrs == (False, False, False, False, False)
