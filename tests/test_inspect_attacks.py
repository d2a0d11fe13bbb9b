"""`pgflow inspect` under attack: every query here is refused with a one-line reason,
and running them all against a live database leaves no trace (issue 10, items 1-4).

``{victim}`` is the pid of another session (``pg_terminate_backend`` target),
``{slot}`` a replication slot name and ``{key}`` an advisory-lock key, all unique to
the test run, so the side-effect checks look for exactly what an attack would leave.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgflow.ops.inspect import (
    READER_ROLE,
    InspectFailed,
    InspectRefused,
    inspect,
    run_validated,
    validate,
)
from pgflow.testing import run_sync

LONG = "a" * 63

# (query, words the one-line reason must contain)
ATTACKS: dict[str, tuple[str, str]] = {
    # 1. attribute notation: PostgreSQL reads (x).f and a.f as f(x) / f(a)
    "attr pg_read_file": ("SELECT ('/etc/passwd'::text).pg_read_file", "field selection"),
    "attr pg_ls_dir": ("SELECT ('.'::text).pg_ls_dir", "field selection"),
    "attr current_setting": ("SELECT ('data_directory'::text).current_setting", "field selection"),
    "attr terminate": ("SELECT ({victim}).pg_terminate_backend", "field selection"),
    "attr slot": ("SELECT ('{slot}'::name).pg_create_physical_replication_slot", "field selection"),
    "attr advisory lock": ("SELECT ({key}::bigint).pg_advisory_lock", "field selection"),
    "attr try advisory lock": ("SELECT (({key})::bigint).pg_try_advisory_lock", "field selection"),
    "attr on subquery": ("SELECT (SELECT '/etc/passwd'::text).pg_read_file", "field selection"),
    "attr on row": ("SELECT (r).pg_read_file FROM runs r", "field selection"),
    "attr on column": ("SELECT (foreign_id::text).pg_read_file FROM runs", "field selection"),
    "attr in join on": (
        "SELECT 1 FROM runs r JOIN horizon h ON (h.pid).pg_terminate_backend",
        "field selection",
    ),
    "column dot function": ("SELECT foreign_id.pg_read_file FROM runs", "not a table"),
    "column dot terminate": ("SELECT pid.pg_terminate_backend FROM horizon", "not a table"),
    "subquery column dot": (
        "SELECT x.pg_read_file FROM (SELECT '/etc/passwd'::text AS x) s",
        "not a table",
    ),
    "three-part column": (
        "SELECT s.x.pg_read_file FROM (SELECT '/etc/passwd'::text AS x) s",
        "one qualifier",
    ),
    "alias invisible to sibling": (
        "SELECT * FROM (SELECT 1) AS a,"
        " (SELECT a.pg_read_file FROM (SELECT '/etc/passwd'::text AS a) x) y",
        "not a table",
    ),
    "alias invisible in on across comma": (
        "SELECT 1 FROM (SELECT '/etc/passwd'::text AS a) a, runs r"
        " JOIN run_history h ON a.pg_read_file IS NOT NULL",
        "not a table",
    ),
    "attr in where subquery": (
        "SELECT * FROM runs WHERE foreign_id IN"
        " (SELECT x.pg_read_file FROM (SELECT '/etc/passwd'::text AS x) s)",
        "not a table",
    ),
    "attr in lateral values": (
        "SELECT * FROM (VALUES ({key}::bigint)) v(k), LATERAL (SELECT (v.k).pg_advisory_lock) x",
        "field selection",
    ),
    "scalar function alias": (
        "SELECT g.pg_advisory_lock FROM generate_series({key}, {key}) g",
        "not a column of the function",
    ),
    "unnest alias": (
        "SELECT u.pg_read_file FROM unnest(ARRAY['/etc/passwd']) u",
        "not a column of the function",
    ),
    "lateral function alias": (
        "SELECT u.pg_read_file FROM runs r, LATERAL jsonb_array_elements_text(r.object) u",
        "not a column of the function",
    ),
    "declared function columns": (
        "SELECT e.pg_read_file FROM runs r, jsonb_each_text(r.object) AS e(k, v)",
        "not a column of the function",
    ),
    # 2. unicode case folding
    "kelvin cte": ("WITH pg_loc\u212as AS (SELECT 1) SELECT * FROM pg_locks", "non-ascii"),
    "kelvin table": ("SELECT * FROM PG_LOC\u212aS", "non-ascii"),
    "dotted capital i": ("SELECT \u0130d FROM runs", "non-ascii"),
    "long identifiers alias": (
        f"WITH {LONG}x AS (SELECT 1) SELECT * FROM {LONG}y",
        "longer than 63",
    ),
    # 3. casts to type input functions, size amplifiers
    "regclass cast": ("SELECT 'pg_authid'::regclass::oid", "cast to"),
    "regclass CAST": ("SELECT CAST('pg_authid' AS regclass)", "cast to"),
    "qualified regclass": ("SELECT 'pg_catalog.pg_authid'::pg_catalog.regclass", "cast to"),
    "oid cast": ("SELECT '1'::oid", "cast to"),
    "regrole cast": ("SELECT 'postgres'::regrole", "cast to"),
    "regproc cast": ("SELECT 'pg_sleep'::regproc", "cast to"),
    "xml cast": ("SELECT '<a/>'::xml", "cast to"),
    "user type cast": ("SELECT 'x'::public.anything", "cast to"),
    "regclass function cast": ("SELECT regclass('pg_authid')", "regclass()"),
    "regclass attribute cast": ("SELECT foreign_id.regclass FROM runs", "not a table"),
    "format width": ("SELECT format('%2000000000s', 'x')", "widths"),
    "format star width": ("SELECT format('%*s', 2000000000, 'x')", "widths"),
    "format non literal": ("SELECT format(foreign_id, 'x') FROM runs", "literal format"),
    "lpad huge": ("SELECT lpad('x', 2000000000)", "length"),
    "rpad computed": ("SELECT rpad('x', err_count * 1000000) FROM runs", "length"),
    "repeat": ("SELECT repeat('x', 1000000000)", "repeat()"),
    # functions: direct, qualified, quoted
    "pg_read_file": ("SELECT pg_read_file('/etc/passwd')", "pg_read_file()"),
    "qualified pg_read_file": ("SELECT pg_catalog.pg_read_file('/etc/passwd')", "schema-qualified"),
    "qualified lower": ("SELECT pg_catalog.lower('X')", "schema-qualified"),
    "qualified table function": ("SELECT * FROM pg_catalog.pg_ls_dir('.')", "pg_ls_dir()"),
    "public table function": ("SELECT * FROM public.lower('x')", "schema-qualified"),
    "quoted function": ("SELECT \"pg_read_file\"('/etc/passwd')", "quoted function"),
    "U& identifier": ("SELECT U&\"pg_read_file\"('/etc/passwd')", "&"),
    "U& string": ("SELECT U&'\\0070g_read_file'", "u&"),
    "query_to_xml": (
        "SELECT query_to_xml('SELECT pg_read_file(''/etc/passwd'')', true, true, '')",
        "query_to_xml()",
    ),
    "table_to_xml": ("SELECT table_to_xml('pgflow.events', true, true, '')", "table_to_xml()"),
    "xpath": ("SELECT xpath('/a', '<a/>')", "not allowed"),
    "advisory lock": ("SELECT pg_advisory_lock({key})", "pg_advisory_lock()"),
    "advisory xact lock": ("SELECT pg_advisory_xact_lock({key})", "pg_advisory_xact_lock()"),
    "notify": ("SELECT pg_notify('x', 'y')", "pg_notify()"),
    "set_config": ("SELECT set_config('search_path', 'public', true)", "set_config()"),
    "current_setting": ("SELECT current_setting('data_directory')", "current_setting()"),
    "sleep": ("SELECT pg_sleep(10)", "pg_sleep()"),
    "dblink_exec": ("SELECT dblink_exec('dbname=postgres', 'DROP DATABASE x')", "dblink_exec()"),
    "dblink in from": ("SELECT * FROM dblink('dbname=postgres', 'SELECT 1') t(a int)", "dblink"),
    "lo_import": ("SELECT lo_import('/etc/passwd')", "lo_import()"),
    "terminate": ("SELECT pg_terminate_backend({victim})", "pg_terminate_backend()"),
    "slot": (
        "SELECT pg_create_physical_replication_slot('{slot}')",
        "pg_create_physical_replication_slot()",
    ),
    "nextval": ("SELECT nextval('pgflow.events_id_seq')", "nextval()"),
    "array of subquery": ("SELECT ARRAY(SELECT pg_read_file('/etc/passwd'))", "pg_read_file()"),
    "union": ("SELECT 'a' UNION SELECT pg_read_file('/etc/passwd')", "pg_read_file()"),
    # comments
    "comment then statement": (
        "SELECT 1 /* x */; SELECT pg_read_file('/etc/passwd')",
        "exactly one statement",
    ),
    "line comment": ("SELECT 1 -- x\n, pg_read_file('/etc/passwd')", "pg_read_file()"),
    "quote in comments": ("SELECT /* ' */ pg_read_file('/etc/passwd') /* ' */", "pg_read_file()"),
    "comment hiding a quote": ("SELECT '/*', pg_sleep(1) --'", "pg_sleep()"),
    # dollar quoting and escape strings
    "dollar string": ("SELECT $$x$$", "dollar-quoted"),
    "dollar tag": ("SELECT $a$ ' $a$, pg_read_file('/etc/passwd')", "not allowed"),
    "escape string": ("SELECT E'\\'', pg_read_file('/etc/passwd')", "not allowed"),
    "parameter": ("SELECT $1", "parameters"),
    # nested CTE scopes
    "cte reading catalog": (
        "WITH x AS (SELECT * FROM pg_catalog.pg_authid) SELECT * FROM x",
        "pg_authid",
    ),
    "cte deleting": (
        "WITH x AS (DELETE FROM pgflow.records RETURNING *) SELECT * FROM x",
        "DELETE",
    ),
    "nested cte function": (
        "WITH x AS (SELECT 1) SELECT * FROM x, (WITH y AS (SELECT pg_sleep(1)) SELECT * FROM y) z",
        "pg_sleep()",
    ),
    "cte outer reference": (
        "SELECT * FROM runs r WHERE EXISTS (WITH c AS (SELECT r.foreign_id) SELECT * FROM c)",
        "not a table",
    ),
    "catalog in parenthesised join": (
        "SELECT * FROM (pg_catalog.pg_locks JOIN runs ON true)",
        "pg_locks",
    ),
    # TABLE x, VALUES
    "TABLE catalog": ("TABLE pg_catalog.pg_authid", "pg_catalog.pg_authid"),
    "TABLE information_schema": ("TABLE information_schema.tables", "information_schema"),
    "VALUES function": ("VALUES (pg_read_file('/etc/passwd'))", "pg_read_file()"),
    "VALUES in from": (
        "SELECT * FROM (VALUES (pg_ls_dir('.'))) v(f)",
        "pg_ls_dir()",
    ),
    # EXPLAIN, DO, COPY, locking
    "explain analyze": ("EXPLAIN ANALYZE SELECT pg_sleep(1)", "EXPLAIN"),
    "explain analyze delete": ("EXPLAIN (ANALYZE) DELETE FROM pgflow.records", "only"),
    "do block": ("DO $$BEGIN PERFORM pg_sleep(1); END$$", "only"),
    "copy program": ("COPY (SELECT 1) TO PROGRAM 'id'", "COPY"),
    "for update": ("SELECT * FROM pgflow.events FOR UPDATE", "FOR UPDATE"),
    "deep nesting": ("SELECT " + "(" * 2000 + "1" + ")" * 2000, "nested too deeply"),
    "deep function nesting": ("SELECT " + "lower(" * 2000 + "'x'" + ")" * 2000, "nested too"),
    "huge query": ("SELECT 1" + " + 1" * 30000, "longer than"),
    # system columns
    "tableoid regclass": ("SELECT tableoid::regclass FROM pgflow.events", "not allowed"),
    "ctid": ("SELECT ctid FROM pgflow.events", "system column"),
    "qualified tableoid": ("SELECT e.tableoid FROM pgflow.events e", "system column"),
}


def _fill(query: str, victim: int = 12345, slot: str = "x", key: int = 1) -> str:
    return query.replace("{victim}", str(victim)).replace("{slot}", slot).replace("{key}", str(key))


def test_there_are_at_least_sixty_attacks() -> None:
    assert len(ATTACKS) >= 60


@pytest.mark.parametrize("query, reason", ATTACKS.values(), ids=list(ATTACKS))
def test_refused_with_a_one_line_reason(query: str, reason: str) -> None:
    with pytest.raises(InspectRefused) as err:
        validate(_fill(query))
    message = str(err.value)
    assert "\n" not in message and message
    assert reason.lower() in message.lower()


# ------------------------------------------------------------ no side effects
@dataclass
class Marks:
    victim: int
    slot: str
    key: int


@pytest.fixture
def marks(pgflow_dsn: str) -> Iterator[Marks]:
    """A victim session and names no one else uses; leftovers are cleaned up even when
    the test fails (a leaked physical slot would pin WAL on the shared server)."""
    victim = psycopg.connect(pgflow_dsn, autocommit=True)
    slot = f"pgflow_attack_{uuid.uuid4().hex[:12]}"
    key = int(uuid.uuid4().int % (2**62))
    try:
        yield Marks(victim.info.backend_pid, slot, key)
    finally:
        victim.close()
        with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            )


def _assert_no_side_effects(dsn: str, marks: Marks, victim: psycopg.Connection) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        slots = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (marks.slot,)
        ).fetchone()
        assert slots == (0,), "a replication slot was created"
        locks = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND ((classid::bigint << 32) | objid::bigint) = %s",
            (marks.key,),
        ).fetchone()
        assert locks == (0,), "an advisory lock is held"
    assert victim.execute("SELECT pg_backend_pid()").fetchone() == (marks.victim,), (
        "the victim session was killed"
    )


def test_attacks_against_a_live_database_leave_no_trace(pgflow_dsn: str, marks: Marks) -> None:
    victim = psycopg.connect(pgflow_dsn, autocommit=True)
    marks.victim = victim.info.backend_pid

    async def go() -> list[str]:
        ran: list[str] = []
        # One connection for all, kept open: a session-level lock would still be held.
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            passwd = await (await conn.execute("SELECT pg_read_file('/etc/passwd')")).fetchone()
            await conn.rollback()
            assert passwd is not None and "root:" in passwd[0]  # what a breach would show
            for name, (query, _) in ATTACKS.items():
                attack = _fill(query, marks.victim, marks.slot, marks.key)
                try:
                    await inspect(conn, attack)
                    ran.append(name)
                except InspectRefused as err:
                    assert "root:" not in str(err), name
                except InspectFailed:  # reached the server: a validator miss
                    ran.append(name)
            _assert_no_side_effects(pgflow_dsn, marks, victim)
        return ran

    try:
        assert run_sync(go()) == [], "attacks that were not refused"
    finally:
        victim.close()


# Validator misses, simulated: the raw attacks run without validation. The reader role
# alone turns each into a permission error, with no side effect.
ROLE_STOPS = [
    "SELECT ('/etc/passwd'::text).pg_read_file",
    "SELECT ('.'::text).pg_ls_dir",
    "SELECT ('data_directory'::text).current_setting",
    "SELECT ({victim}).pg_terminate_backend",
    "SELECT ('{slot}'::name).pg_create_physical_replication_slot",
    "SELECT * FROM pg_catalog.pg_authid",
    "SELECT * FROM pgflow.events",
    "SELECT * FROM pgflow.records",
    "SELECT lo_import('/etc/passwd')",
    "SELECT nextval('pgflow.events_id_seq')",
    "SELECT pg_catalog.pg_stat_file('/etc/passwd')",
]


def test_the_reader_role_stops_what_the_validator_would_miss(pgflow_dsn: str, marks: Marks) -> None:
    victim = psycopg.connect(pgflow_dsn, autocommit=True)
    marks.victim = victim.info.backend_pid

    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            ok = await run_validated(conn, "SELECT count(*) FROM pgflow.runs")
            assert ok.role == READER_ROLE
            for query in ROLE_STOPS:
                attack = _fill(query, marks.victim, marks.slot, marks.key)
                with pytest.raises(InspectRefused, match=r"permission denied|must be") as err:
                    await run_validated(conn, attack)
                assert "root:" not in str(err.value)

    try:
        run_sync(go())
        _assert_no_side_effects(pgflow_dsn, marks, victim)
    finally:
        victim.close()


# Constructs the validator lets through because they are harmless as rewritten.
def test_harmless_rewrites(pgflow_dsn: str) -> None:
    # A quoted Kelvin-sign CTE is not pg_locks in PostgreSQL either: qualified.
    assert "pgflow.pg_locks" in validate(
        'WITH "pg_loc\u212as" AS (SELECT 1) SELECT * FROM pg_locks'
    )
    # Tables inside parenthesised joins are qualified like any other.
    assert validate(
        "SELECT * FROM (pg_locks JOIN (pg_stat_activity JOIN runs ON true) ON true)"
    ) == (
        "SELECT * FROM (pgflow.pg_locks JOIN (pgflow.pg_stat_activity JOIN pgflow.runs ON TRUE)"
        " ON TRUE)"
    )
    # Nested comments are comments to both parsers, and are dropped.
    assert validate("SELECT 1 /* a /* b */ , pg_sleep(1) */") == "SELECT 1"
    # An inner CTE is invisible outside its WITH.
    assert "FROM a, pgflow.pg_locks" in validate(
        "WITH a AS (WITH pg_locks AS (SELECT 1) SELECT 1) SELECT * FROM a, pg_locks"
    )
    with pytest.raises(InspectFailed, match="does not exist"):
        run_sync(
            inspect(pgflow_dsn, "SELECT * FROM (WITH pg_locks AS (SELECT 1) SELECT 1) s, pg_locks")
        )
    # a.f with a a visible relation is its column, or a read-only function of the row.
    with pytest.raises(InspectFailed, match="does not exist"):
        run_sync(inspect(pgflow_dsn, "SELECT r.pg_read_file FROM runs r"))
    result = run_sync(inspect(pgflow_dsn, "SELECT r.to_jsonb FROM runs r"))
    assert result.rows == [] and result.role == READER_ROLE
    # Subqueries, VALUES and CTEs are composite rows: no lock function takes them.
    for query in (
        "SELECT x.pg_advisory_lock FROM (SELECT 424242::bigint) x",
        "SELECT v.pg_advisory_lock FROM (VALUES (424243::bigint)) v",
        "WITH c AS (SELECT 424244::bigint) SELECT c.pg_advisory_lock FROM c",
        "SELECT rr.pg_advisory_lock FROM runs r, LATERAL (SELECT 424246::bigint) rr",
    ):
        with pytest.raises(InspectFailed, match="does not exist"):
            run_sync(inspect(pgflow_dsn, query))
    # A function's alias followed by its own column is that column.
    result = run_sync(
        inspect(
            pgflow_dsn,
            "SELECT pg_advisory_lock.pg_advisory_lock FROM"
            " generate_series(424245, 424245) pg_advisory_lock",
        )
    )
    assert result.rows == [(424245,)]
    with psycopg.connect(pgflow_dsn) as conn:
        locks = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND objid BETWEEN 424242 AND 424246"
        ).fetchone()
    assert locks == (0,)


# ------------------------------------------------------------------ byte cap
def test_byte_cap_truncates_while_fetching(pgflow_dsn: str) -> None:
    query = "SELECT g, lpad('x', 10000) AS pad FROM generate_series(1, 1000) g ORDER BY g"
    result = run_sync(inspect(pgflow_dsn, query, max_bytes=50_000))
    assert result.truncated and len(result.rows) == 4
    assert [r[0] for r in result.rows] == [1, 2, 3, 4]
    assert result.bytes <= 50_000
    full = run_sync(inspect(pgflow_dsn, query, limit=2000, max_bytes=20_000_000))
    assert not full.truncated and len(full.rows) == 1000
    # Duplicate column names and no columns at all go through the wrapper too.
    assert run_sync(inspect(pgflow_dsn, "SELECT 1, 1")).rows == [(1, 1)]
    empty = run_sync(inspect(pgflow_dsn, "SELECT FROM generate_series(1, 2)"))
    assert empty.columns == [] and empty.rows == [(), ()]


@pytest.mark.parametrize(
    "query",
    [
        "SELECT string_agg(lpad('x', 10000), '') FROM generate_series(1, 100)",
        # a column named like the wrapper's alias must not hide the row from the count
        "SELECT 1 AS s, string_agg(lpad('x', 10000), '') FROM generate_series(1, 100)",
    ],
)
def test_a_row_over_the_byte_cap_is_refused_by_the_server(pgflow_dsn: str, query: str) -> None:
    with pytest.raises(InspectFailed, match=r"first row is 10000\d\d bytes, over the 100000-byte"):
        run_sync(inspect(pgflow_dsn, query, max_bytes=100_000))


# ------------------------------------------------------- non-superuser deployments
def _dsn_as(dsn: str, user: str) -> str:
    params: dict[str, Any] = dict(conninfo_to_dict(dsn))
    params["user"] = user
    return make_conninfo("", **params)


@pytest.fixture
def app_role(pgflow_dsn: str) -> Iterator[str]:
    """A LOGIN role without superuser (cluster-wide: unique name, dropped after)."""
    name = f"pgflow_insp_{uuid.uuid4().hex[:12]}"
    ident = sql.Identifier(name)
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgflow TO {}").format(ident))
        conn.execute(sql.SQL("GRANT SELECT ON pgflow.runs TO {}").format(ident))
        conn.execute(sql.SQL("GRANT USAGE ON SEQUENCE pgflow.events_id_seq TO {}").format(ident))
    try:
        yield name
    finally:
        with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(READER_ROLE), ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))


def test_non_superuser_with_and_without_the_reader_grant(pgflow_dsn: str, app_role: str) -> None:
    dsn = _dsn_as(pgflow_dsn, app_role)

    # Without membership in pgflow_reader: runs under its own role, still fenced.
    result = run_sync(inspect(dsn, "SELECT count(*) FROM runs"))
    assert result.role == app_role and result.rows == [(0,)]

    async def raw(statement: str) -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            await run_validated(conn, statement)

    # It may use the sequence, but READ ONLY stops the write.
    with pytest.raises(InspectRefused, match="read-only transaction"):
        run_sync(raw("SELECT nextval('pgflow.events_id_seq')"))
    with pytest.raises(InspectRefused, match="not allowed"):
        run_sync(inspect(dsn, "SELECT ('/etc/passwd'::text).pg_read_file"))

    # With GRANT pgflow_reader TO app_role: runs as pgflow_reader.
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("GRANT {} TO {}").format(sql.Identifier(READER_ROLE), sql.Identifier(app_role))
        )
    result = run_sync(inspect(dsn, "SELECT count(*) FROM stuck_runs"))
    assert result.role == READER_ROLE and result.rows == [(0,)]
    with pytest.raises(InspectRefused, match="permission denied"):
        run_sync(raw("SELECT nextval('pgflow.events_id_seq')"))


def test_identifiers_fold_like_postgresql() -> None:
    from pgflow.ops._inspect_validate import _fold

    # Python's str.lower() folds U+212A KELVIN SIGN to "k"; PostgreSQL only folds A-Z.
    assert _fold("PG_LOC\u212aS", quoted=False) == "pg_loc\u212as"
    assert _fold("Runs", quoted=True) == "Runs"
    assert _fold("RUNS", quoted=False) == "runs"


@pytest.mark.parametrize("attributes", [None, "LOGIN", "SUPERUSER", "BYPASSRLS"])
def test_a_superuser_never_runs_without_a_sound_reader_role(
    pgflow_dsn: str, monkeypatch: pytest.MonkeyPatch, attributes: str | None
) -> None:
    import pgflow.ops.inspect

    name = f"pgflow_reader_{uuid.uuid4().hex[:12]}"
    monkeypatch.setattr(pgflow.ops.inspect, "READER_ROLE", name)
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        if attributes:  # exists, but would be no fence
            conn.execute(sql.SQL("CREATE ROLE {} " + attributes).format(sql.Identifier(name)))
        try:
            with pytest.raises(InspectRefused, match=f"role {name} is missing, not granted"):
                run_sync(inspect(pgflow_dsn, "SELECT count(*) FROM runs"))
        finally:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_nothing_past_the_byte_cap_leaves_the_server(pgflow_dsn: str) -> None:
    from pgflow.ops.inspect import _capped

    statement = validate("SELECT g, lpad('x', 10000) FROM generate_series(1, 8) g ORDER BY g")
    with psycopg.connect(pgflow_dsn) as conn:
        rows = conn.execute(_capped(statement, 2, 50_000)).fetchall()
    sent = [(n > 0, g is not None, pad is not None) for n, g, pad in rows]
    assert sent == [(True, True, True)] * 4 + [(False, False, False)] * 4
    # A constant row (which the planner could fold into one evaluation) counts every time.
    constant = validate("SELECT lpad('x', 1000) FROM generate_series(1, 10)")
    with psycopg.connect(pgflow_dsn) as conn:
        rows = conn.execute(_capped(constant, 1, 5_000)).fetchall()
    assert [r[1] is not None for r in rows] == [True] * 4 + [False] * 6
    # Sticky: a small row after the cap was passed is not sent either.
    small_after_big = validate(
        "SELECT CASE WHEN g = 2 THEN lpad('x', 9000) ELSE 'y' END"
        " FROM generate_series(1, 4) g ORDER BY g"
    )
    with psycopg.connect(pgflow_dsn) as conn:
        rows = conn.execute(_capped(small_after_big, 1, 5_000)).fetchall()
    assert [r[1] is not None for r in rows] == [True, False, False, False]


def test_cli_says_when_the_byte_cap_cut_rows(
    pgflow_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pgflow.cli import main

    query = "SELECT lpad('x', 1000) FROM generate_series(1, 100)"
    assert main(["inspect", query, "--dsn", pgflow_dsn, "--max-bytes", "5000"]) == 0
    captured = capsys.readouterr()
    assert "(4 rows)" in captured.out
    assert "rows cut at the --max-bytes cap (5000 bytes)" in captured.err


def test_a_database_not_migrated_for_the_reader_says_migrate(pgflow_dsn: str) -> None:
    # pgflow_reader exists on the server (roles are cluster-wide) but was never granted
    # anything in this database: as after upgrading pgflow without `pgflow migrate`.
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute("REVOKE USAGE ON SCHEMA pgflow FROM pgflow_reader")
    with pytest.raises(InspectRefused, match="run `pgflow migrate`"):
        run_sync(inspect(pgflow_dsn, "SELECT count(*) FROM runs"))
