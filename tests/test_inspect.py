"""`pgflow inspect`: refuses anything but one read-only SELECT over pgflow's relations."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest

from pgflow.cli import main
from pgflow.ops.inspect import InspectFailed, InspectRefused, inspect, validate
from pgflow.testing import run_sync
from tests.test_views import build_scenario

# ------------------------------------------------------------------ refusals
REFUSED = {
    "insert": ("INSERT INTO pgflow.records (run_id) VALUES (gen_random_uuid())", "INSERT"),
    "update": ("UPDATE pgflow.records SET status = 'x'", "UPDATE"),
    "delete": ("DELETE FROM pgflow.records", "DELETE"),
    "truncate": ("TRUNCATE pgflow.events", "TRUNCATE"),
    "drop": ("DROP TABLE pgflow.records", "DROP"),
    "create": ("CREATE TABLE pgflow.x (a int)", "CREATE"),
    "alter": ("ALTER TABLE pgflow.records ADD COLUMN x int", "ALTER"),
    "two statements": ("SELECT 1; SELECT 2", "exactly one statement"),
    "select then delete": ("SELECT 1; DELETE FROM pgflow.records", "exactly one statement"),
    "pg_sleep": ("SELECT pg_sleep(10)", "pg_sleep"),
    "pg_sleep qualified": ("SELECT pg_catalog.pg_sleep(10)", "pg_sleep"),
    "pg_read_file": ("SELECT pg_read_file('/etc/passwd')", "pg_read_file"),
    "pg_ls_dir in from": ("SELECT * FROM pg_ls_dir('.') AS f", "pg_ls_dir"),
    "dblink": ("SELECT * FROM dblink('host=evil', 'DELETE FROM x') AS t(a int)", "dblink"),
    "lo_import": ("SELECT lo_import('/etc/passwd')", "lo_import"),
    "set_config": ("SELECT set_config('statement_timeout', '0', false)", "set_config"),
    "nextval": ("SELECT nextval('pgflow.events_id_seq')", "nextval"),
    "pg_terminate_backend": ("SELECT pg_terminate_backend(1)", "pg_terminate_backend"),
    "function in where": ("SELECT 1 FROM pgflow.runs WHERE pg_sleep(1) IS NULL", "pg_sleep"),
    "unknown function": ("SELECT my_func(1)", "my_func"),
    "for update": ("SELECT * FROM pgflow.records FOR UPDATE", "FOR UPDATE"),
    "for share": ("SELECT * FROM runs FOR SHARE", "FOR UPDATE/SHARE"),
    "for no key update": ("SELECT * FROM pgflow.records FOR NO KEY UPDATE", "FOR UPDATE"),
    "cte with delete": (
        "WITH gone AS (DELETE FROM pgflow.records RETURNING *) SELECT * FROM gone",
        "DELETE",
    ),
    "cte with insert": (
        "WITH x AS (INSERT INTO pgflow.dead_letters (consumer, event_id, reason)"
        " VALUES ('a', 'b', 'c') RETURNING id) SELECT * FROM x",
        "INSERT",
    ),
    "select into": ("SELECT * INTO pgflow.copy FROM pgflow.runs", "INTO"),
    "copy": ("COPY pgflow.records TO '/tmp/x'", "COPY"),
    "set": ("SET statement_timeout = 0", "SET"),
    "explain": ("EXPLAIN ANALYZE SELECT * FROM pgflow.runs", "EXPLAIN"),
    "do block": ("DO $$ BEGIN DELETE FROM pgflow.records; END $$", "only read-only"),
    "call": ("CALL pgflow.something()", "only read-only"),
    "pg_authid": ("SELECT rolname, rolpassword FROM pg_catalog.pg_authid", "pg_catalog.pg_authid"),
    "information_schema": ("SELECT * FROM information_schema.tables", "information_schema"),
    "public table": ("SELECT * FROM public.x", "public.x"),
    "other schema in subquery": (
        "SELECT * FROM pgflow.runs WHERE foreign_id IN (SELECT usename FROM pg_catalog.pg_user)",
        "pg_catalog.pg_user",
    ),
    "other schema in join": (
        "SELECT * FROM pgflow.runs r JOIN pg_catalog.pg_stat_activity a ON true",
        "pg_stat_activity",
    ),
    "other database": ("SELECT * FROM otherdb.pgflow.runs", "cross-database"),
    "quoted schema case": ('SELECT * FROM "PGFLOW".runs', "schema pgflow"),
    "garbage": ("SELEKT * FROM runs", "cannot parse"),
    "empty": ("   ", "empty"),
}


@pytest.mark.parametrize("sql, reason", REFUSED.values(), ids=list(REFUSED))
def test_refused_with_a_reason(sql: str, reason: str) -> None:
    with pytest.raises(InspectRefused) as err:
        validate(sql)
    assert reason.lower() in str(err.value).lower()


def test_unqualified_names_mean_pgflow_and_ctes_stay_ctes() -> None:
    assert validate("SELECT * FROM runs") == "SELECT * FROM pgflow.runs"
    # pg_authid unqualified is pgflow.pg_authid (which does not exist), never pg_catalog's.
    assert validate("SELECT * FROM pg_authid") == "SELECT * FROM pgflow.pg_authid"
    assert validate("TABLE pg_authid") == "SELECT * FROM pgflow.pg_authid"
    sql = validate("WITH r AS (SELECT * FROM runs) SELECT * FROM r JOIN stuck_runs USING (run_id)")
    assert "FROM pgflow.runs" in sql and "FROM r JOIN pgflow.stuck_runs" in sql
    # A CTE is only visible inside its WITH: the outer name is a real (pgflow) table.
    sql = validate("SELECT * FROM (WITH pg_authid AS (SELECT 1) SELECT 1) s, pg_authid")
    assert sql.endswith("AS s, pgflow.pg_authid")
    # Non-recursive CTEs cannot see themselves or later ones.
    sql = validate("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b")
    assert "FROM pgflow.b" in sql and "FROM a, b" in sql
    sql = validate(
        "WITH RECURSIVE n AS (SELECT 1 AS i UNION ALL SELECT i + 1 FROM n WHERE i < 3)"
        " SELECT * FROM n"
    )
    assert "pgflow" not in sql


# ------------------------------------------------------------------ execution
@pytest.fixture
def scenario_dsn(pgflow_dsn: str) -> str:
    import psycopg

    async def setup() -> None:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            await build_scenario(conn)

    run_sync(setup())
    return pgflow_dsn


def run(dsn: str, sql: str, **kw: Any) -> Any:
    return run_sync(inspect(dsn, sql, **kw))


def test_accepts_joins_and_aggregates_over_views(scenario_dsn: str) -> None:
    result = run(
        scenario_dsn,
        "SELECT r.workflow, r.run_state, count(*) AS runs, max(h.step) AS steps,"
        " sum((r.object ->> 'amount')::int) AS amount"
        " FROM runs r JOIN run_history h USING (run_id)"
        " WHERE r.foreign_id LIKE 'order-%' AND r.updated_at > now() - interval '1 day'"
        " GROUP BY 1, 2 ORDER BY 1, 2",
    )
    assert result.columns == ["workflow", "run_state", "runs", "steps", "amount"]
    got = {(r[0], r[1]): r[2:] for r in result.rows}
    assert got[("orders", "COMPLETED")] == (3, 3, 30)  # 3 history rows of one run
    assert got[("orders", "PAUSED")][1] == 3
    assert not result.truncated


def test_accepts_ctes_windows_and_jsonb(scenario_dsn: str) -> None:
    result = run(
        scenario_dsn,
        "WITH latest AS (SELECT foreign_id, status, row_number() OVER"
        " (PARTITION BY foreign_id ORDER BY created_at DESC) AS n FROM pgflow.runs)"
        " SELECT foreign_id, status FROM latest WHERE n = 1 AND foreign_id = 'order-1'",
    )
    assert len(result.rows) == 1
    result = run(
        scenario_dsn,
        "SELECT foreign_id FROM runs WHERE object @> '{\"amount\": 10}' AND object ? 'amount'"
        " AND jsonb_typeof(object -> 'amount') = 'number' ORDER BY foreign_id LIMIT 2",
    )
    assert result.rows == [("order-1",), ("order-1",)]
    result = run(
        scenario_dsn,
        "SELECT reason, count(*) FROM stuck_runs GROUP BY reason ORDER BY reason",
    )
    assert dict(result.rows) == {"erroring": 1, "idle": 1, "paused": 1, "timer overdue": 1}


def test_unknown_pgflow_relation_fails_cleanly(scenario_dsn: str) -> None:
    with pytest.raises(InspectFailed, match=r"pgflow\.pg_authid.* does not exist"):
        run(scenario_dsn, "SELECT * FROM pg_authid")


def test_row_limit_and_truncation(scenario_dsn: str) -> None:
    result = run(scenario_dsn, "SELECT * FROM runs ORDER BY foreign_id", limit=3)
    assert len(result.rows) == 3 and result.truncated
    result = run(scenario_dsn, "SELECT * FROM runs", limit=7)
    assert len(result.rows) == 7 and not result.truncated


def test_statement_timeout(scenario_dsn: str) -> None:
    # A legal but slow query (a big cross join) is cancelled by the server.
    slow = (
        "SELECT count(*) FROM generate_series(1, 100000000) a CROSS JOIN generate_series(1, 100) b"
    )
    with pytest.raises(InspectFailed, match="timeout"):
        run(scenario_dsn, slow, timeout=0.3)


def test_runs_in_a_read_only_transaction_that_is_rolled_back(scenario_dsn: str) -> None:
    import psycopg

    from pgflow.ops.inspect import run_validated

    async def go() -> None:
        # prepare_threshold=None: tests/test_pooled.py runs this through pgbouncer too
        async with await psycopg.AsyncConnection.connect(
            scenario_dsn, prepare_threshold=None
        ) as conn:
            # Even a statement that slipped past validation could not write (here the
            # reader role stops it first; test_inspect_attacks checks READ ONLY alone).
            with pytest.raises(InspectRefused, match=r"permission denied|read-only"):
                await run_validated(
                    conn,
                    "SELECT * FROM (SELECT 1) x,"
                    " LATERAL (SELECT nextval('pgflow.events_id_seq')) y",
                )
            result = await run_validated(
                conn,
                "SELECT current_setting('transaction_read_only'),"
                " current_setting('statement_timeout')",
                timeout=2.5,
            )
            assert result.rows == [("on", "2500ms")]
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    run_sync(go())


# ------------------------------------------------------------------ the command
def test_cli_table_json_csv(scenario_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    sql = (
        "SELECT foreign_id, status, run_state, err_count FROM runs"
        " WHERE workflow = 'orders' ORDER BY foreign_id"
    )
    assert main(["inspect", sql, "--dsn", scenario_dsn]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["foreign_id", "status", "run_state", "err_count"]
    assert set(out[1]) <= {"-", " "}
    assert out[2].split() == ["order-1", "SHIPPED", "COMPLETED", "0"]
    assert out[-1] == "(6 rows)"
    # columns are aligned: every row has the status column at the same offset
    col = out[0].index("status")
    assert all(line[col - 1] == " " and line[col] != " " for line in out[2:-1])

    assert main(["inspect", sql, "--dsn", scenario_dsn, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0] == {
        "foreign_id": "order-1",
        "status": "SHIPPED",
        "run_state": "COMPLETED",
        "err_count": 0,
    }
    assert len(data) == 6

    assert main(["inspect", sql, "--dsn", scenario_dsn, "--csv"]) == 0
    parsed = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert parsed[0] == ["foreign_id", "status", "run_state", "err_count"]
    assert parsed[2] == ["order-2", "CREATED", "INITIATED", "2"]


def test_cli_refusal_exits_1_with_the_reason(
    scenario_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "DELETE FROM pgflow.records", "--dsn", scenario_dsn]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pgflow: error: only read-only SELECT queries are allowed")
    assert main(["inspect", "SELECT * FROM runs", "--dsn", scenario_dsn, "--limit", "2"]) == 0
    assert "(2 rows) (more rows exist: raise --limit)" in capsys.readouterr().out


def test_horizon_sees_other_sessions_under_the_reader_role(pgflow_dsn: str) -> None:
    import psycopg

    with psycopg.connect(pgflow_dsn) as holder:
        holder.execute("SELECT pg_current_xact_id()")  # holds an xid, stays open
        result = run(pgflow_dsn, "SELECT pid FROM horizon WHERE pid IS NOT NULL")
        assert result.role == "pgflow_reader"
        # Other sessions on the shared server may hold older xids; ours is one of the
        # holders, so the view must show *a* holder, never none.
        assert result.rows, "horizon is blind to other sessions under pgflow_reader"
        holders = run(pgflow_dsn, "SELECT count(*) FROM horizon WHERE age_seconds > 0")
        assert holders.rows == [(1,)]


def test_a_connection_inside_a_transaction_is_refused(pgflow_dsn: str) -> None:
    import psycopg

    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            await conn.execute("SELECT 1")  # opens a transaction (not autocommit)
            with pytest.raises(ValueError, match="not in a transaction"):
                await inspect(conn, "SELECT 1")

    run_sync(go())
