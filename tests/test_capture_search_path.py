"""Change capture never runs code from the writer's search_path (issue 10, item 5).

The trigger runs as whoever writes to the captured table, often a superuser. A role
that can CREATE in a schema on that writer's search_path defines an exact-match
``public.to_jsonb(public.payments)``; before migration 0007 the trigger's
``to_jsonb(NEW)`` resolved to it and ran it with the writer's privileges.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql


@pytest.fixture
def attacker(pgflow_dsn: str) -> Iterator[str]:
    """A throw-away role with CREATE on schema public (roles are cluster-wide: unique
    name, dropped afterwards)."""
    name = f"pgflow_attacker_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
        conn.execute(
            sql.SQL("GRANT CREATE, USAGE ON SCHEMA public TO {}").format(sql.Identifier(name))
        )
    try:
        yield name
    finally:
        with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _is_createrole(conn: psycopg.Connection, role: str) -> bool:
    row = conn.execute("SELECT rolcreaterole FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    assert row is not None
    return bool(row[0])


def test_shadowing_to_jsonb_in_public_is_not_called(pgflow_dsn: str, attacker: str) -> None:
    role = sql.Identifier(attacker)
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.payments (id int PRIMARY KEY, amount int)")
        conn.execute(sql.SQL("GRANT SELECT ON public.payments TO {}").format(role))
        conn.execute("SELECT pgflow.capture('public.payments')")
        # The attacker's objects, owned by the attacker.
        conn.execute(sql.SQL("SET ROLE {}").format(role))
        for fn in ("to_jsonb", "jsonb_agg"):
            conn.execute(
                sql.SQL(
                    "CREATE FUNCTION public.{fn}(public.payments) RETURNS jsonb"
                    " LANGUAGE plpgsql AS $f$ BEGIN"
                    " EXECUTE 'ALTER ROLE {role} CREATEROLE';"
                    " RETURN '{{}}'::jsonb; END $f$"
                ).format(fn=sql.Identifier(fn), role=role)
            )
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION public.unnest(text[]) RETURNS SETOF text"
                " LANGUAGE plpgsql AS $f$ BEGIN"
                " EXECUTE 'ALTER ROLE {role} CREATEROLE'; END $f$"
            ).format(role=role)
        )
        conn.execute("RESET ROLE")
        assert not _is_createrole(conn, attacker)

        # The superuser writes with the ordinary search_path ("$user", public).
        conn.execute('SET search_path = "$user", public')
        conn.execute("INSERT INTO payments VALUES (1, 10)")
        conn.execute("UPDATE payments SET amount = 11")
        conn.execute("DELETE FROM payments")
        # A composite key exercises jsonb_agg/unnest in the trigger too.
        conn.execute("CREATE TABLE public.lines (o int, l int, PRIMARY KEY (o, l))")
        conn.execute("SELECT pgflow.capture('lines')")
        conn.execute("INSERT INTO lines VALUES (1, 2)")

        assert not _is_createrole(conn, attacker), "the writer ran the attacker's function"
        rows = conn.execute(
            "SELECT table_name, op, pk, new ->> 'amount' FROM pgflow.changes ORDER BY id"
        ).fetchall()
        assert rows == [
            ("public.payments", "INSERT", "1", "10"),
            ("public.payments", "UPDATE", "1", "11"),
            ("public.payments", "DELETE", "1", None),
            ("public.lines", "INSERT", "[1, 2]", None),
        ]


def test_capture_functions_pin_search_path(pgflow_dsn: str) -> None:
    with psycopg.connect(pgflow_dsn) as conn:
        rows = conn.execute(
            "SELECT proname, proconfig FROM pg_proc WHERE pronamespace = 'pgflow'::regnamespace"
            " AND proname IN ('capture_change', 'capture', 'uncapture') ORDER BY 1"
        ).fetchall()
    assert [r[0] for r in rows] == ["capture", "capture_change", "uncapture"]
    assert all(r[1] == ["search_path=pg_catalog, pg_temp"] for r in rows)


def test_0007_replaces_only_0004_bodies_and_pins_any(pgflow_dsn: str) -> None:
    """Migration order across branches must not lose work: 0007 qualifies a capture
    function only while its body is still 0004's; any other body is kept, pinned."""
    from pgflow.ops.migrations import resource_dir

    migrations = resource_dir("migrations")
    m0004 = (migrations / "0004_capture.sql").read_text()
    m0007 = (migrations / "0007_capture_search_path.sql").read_text()
    old_bodies = m0004[m0004.index("CREATE FUNCTION pgflow.capture_change") :].replace(
        "CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"
    )
    sources = (
        "SELECT proname, prosrc, proconfig FROM pg_proc WHERE pronamespace ="
        " 'pgflow'::regnamespace AND proname IN ('capture_change', 'capture', 'uncapture')"
    )
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        # Back to 0004 (unpinned), then 0007 again: all three qualified and pinned.
        conn.execute(old_bodies)
        for f in ("capture_change()", "capture(regclass, text[])", "uncapture(regclass)"):
            conn.execute(f"ALTER FUNCTION pgflow.{f} RESET search_path")
        conn.execute(m0007)
        rows = {r[0]: r[1:] for r in conn.execute(sources).fetchall()}
        assert "pg_catalog.to_jsonb(NEW)" in rows["capture_change"][0]
        assert all(cfg == ["search_path=pg_catalog, pg_temp"] for _, cfg in rows.values())

        # Someone else's newer body: kept, only pinned.
        conn.execute(
            "CREATE OR REPLACE FUNCTION pgflow.capture_change() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN /* newer */ RETURN NULL; END $$"
        )
        conn.execute("ALTER FUNCTION pgflow.capture_change() RESET search_path")
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        conn.execute(m0007)
        rows = {r[0]: r[1:] for r in conn.execute(sources).fetchall()}
        assert "/* newer */" in rows["capture_change"][0]
        assert rows["capture_change"][1] == ["search_path=pg_catalog, pg_temp"]
        assert any("capture_change() was changed by another migration" in n for n in notices)
