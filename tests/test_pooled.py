"""The pooled test group: pgflow through a real pgbouncer in transaction mode.

Every test here talks to PostgreSQL through the ``bouncer`` fixture (tests/_pgbouncer.py:
few server connections, round-robin, so consecutive transactions of one client land
on different server sessions). ``pgflow_dsn`` is the pooled DSN, with
``PGFLOW_POOLER=transaction`` and ``PGFLOW_LISTEN_DSN`` (the direct DSN) set, as a
production deployment would; ``direct_dsn`` reaches the same database directly.

Re-run unchanged through the bouncer: the workflow core tests, the failure/timeout/
callback/schedule tests, the table connector tests, the inspect tests and the
one-process-several-workflows worker test. Written for it: the bouncer really
multiplexes sessions (the harness is hostile), two ``pgflow worker`` processes, the
polling fallback without a LISTEN session, migrate's lock, ``pgflow stuck --after``,
the option's validation, and a short chaos run (SIGKILL/SIGTERM workers,
``pg_terminate_backend`` on the bouncer's server connections): 0 lost, 0 duplicated.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

import pgflow
import pgflow.sync
from pgflow import _db
from pgflow.cli import main
from pgflow.errors import ConfigError
from pgflow.log.listener import Listener
from pgflow.ops.migrations import known_migrations, migrate
from pgflow.testing import Connections, TestDatabases, require
from tests import (
    test_cli_worker,
    test_connector_table,
    test_inspect,
    test_workflow_core,
    test_workflow_failures,
)
from tests._pgbouncer import PgBouncer
from tests.test_workflow_chaos import chaos_run

ROOT = Path(__file__).resolve().parent.parent
PGFLOW = str(Path(sys.executable).with_name("pgflow"))


# -- fixtures: the same names the re-run tests ask for, through the bouncer -------------


@pytest.fixture
def direct_dsn(pgflow_server: TestDatabases) -> Iterator[str]:
    """A fresh migrated database, reached directly."""
    dsn = pgflow_server.create()
    try:
        yield dsn
    finally:
        pgflow_server.drop(dsn)


@pytest.fixture
def pgflow_dsn(direct_dsn: str, bouncer: PgBouncer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The same database through pgbouncer, configured the documented way."""
    monkeypatch.setenv("PGFLOW_POOLER", "transaction")
    monkeypatch.setenv("PGFLOW_LISTEN_DSN", direct_dsn)
    return bouncer.dsn_for(direct_dsn)


@pytest.fixture
async def pool(pgflow_dsn: str) -> AsyncIterator[AsyncConnectionPool[AsyncConnection[Any]]]:
    p: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
        pgflow_dsn, min_size=1, max_size=8, open=False, kwargs={"prepare_threshold": None}
    )
    await p.open(wait=True)
    try:
        yield p
    finally:
        await p.close()


def _rerun(module: ModuleType, *names: str) -> None:
    """Collect ``module``'s tests (all, or ``names``) here too, with the fixtures above."""
    for name in names or [n for n in vars(module) if n.startswith("test_")]:
        assert name not in globals(), f"two re-run tests named {name}"
        globals()[name] = getattr(module, name)


_rerun(test_workflow_core)
_rerun(test_workflow_failures)
_rerun(
    test_connector_table,
    "test_transactional_ack_commits_with_effects",
    "test_acks_write_the_cursor_once_per_batch",
    "test_one_owner_per_consumer_name",
    "test_late_commit_is_not_skipped",
    "test_malformed_row_is_reported_with_an_ack",
    "test_plain_recv_is_at_least_once",
)
scenario_dsn = test_inspect.scenario_dsn
_rerun(test_inspect, *(n for n in vars(test_inspect) if n.startswith("test_") and "_cli_" in n))
_rerun(
    test_inspect,
    "test_accepts_joins_and_aggregates_over_views",
    "test_accepts_ctes_windows_and_jsonb",
    "test_row_limit_and_truncation",
    "test_statement_timeout",
    "test_runs_in_a_read_only_transaction_that_is_rolled_back",
)
_rerun(test_cli_worker, "test_one_worker_process_runs_several_workflows")


# -- the harness is hostile: sessions really are multiplexed ----------------------------


async def test_the_bouncer_hands_one_client_several_sessions(pgflow_dsn: str) -> None:
    """Without ``prepare_threshold=None`` psycopg's prepared statements break at once:
    proof that consecutive transactions of one client run on different sessions."""
    holders = [await AsyncConnection.connect(pgflow_dsn, prepare_threshold=None) for _ in range(4)]
    for conn in holders:  # four server sessions open at once
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")
    for conn in holders:
        await conn.execute("COMMIT")
        await conn.close()
    async with await AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        pids = set()
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            for _ in range(20):  # psycopg prepares on the 5th run of a statement
                cur = await conn.execute("SELECT pg_backend_pid()")
                pids.add((await cur.fetchone() or [0])[0])
        assert len(pids) > 1


# -- the option and its validation --------------------------------------------------------


class S(enum.IntEnum):
    NEW = 1
    DONE = 2


def _two_status_builder() -> pgflow.Builder[dict[str, Any], S]:
    b: pgflow.Builder[dict[str, Any], S] = pgflow.Builder("pooled", dict, S)
    b.add_step(S.NEW, lambda run: S.DONE, S.DONE)
    return b


def test_pooler_values_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = "postgresql://postgres@127.0.0.1:5432/unused"
    built = _two_status_builder().build(dsn, pooler="transaction")
    assert Connections.of(built).pooler == "transaction"
    with pytest.raises(ConfigError, match="needs multi-statement transactions"):
        _two_status_builder().build(dsn, pooler="statement")
    with pytest.raises(ConfigError, match="pooler must be one of none, session, transaction"):
        _two_status_builder().build(dsn, pooler="bouncy")
    monkeypatch.setenv("PGFLOW_POOLER", "Transaction")
    wf = _two_status_builder().build(dsn)
    assert Connections.of(wf).pooler == "transaction"
    assert Connections.of(wf).listen_dsn is None  # LISTEN needs a session: none without listen_dsn
    assert _db.connect_kwargs(dsn)["prepare_threshold"] is None
    monkeypatch.setenv("PGFLOW_LISTEN_DSN", dsn)
    assert Connections.of(wf).listen_dsn == dsn
    monkeypatch.setenv("PGFLOW_POOLER", "nope")
    with pytest.raises(ConfigError, match="PGFLOW_POOLER must be one of"):
        _two_status_builder().build(dsn)
    monkeypatch.delenv("PGFLOW_POOLER")
    monkeypatch.delenv("PGFLOW_LISTEN_DSN")
    assert "prepare_threshold" not in _db.connect_kwargs(dsn)  # direct: keep prepared plans
    assert Connections.of(_two_status_builder().build(dsn)).listen_dsn == dsn


async def test_a_shared_pool_that_prepares_is_refused(pgflow_dsn: str) -> None:
    prepares: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
        pgflow_dsn, open=False
    )
    with pytest.raises(ConfigError, match="prepare_threshold"):
        _two_status_builder().build(prepares)
    ok: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
        pgflow_dsn, open=False, kwargs={"prepare_threshold": None, "autocommit": True}
    )
    async with ok, _two_status_builder().build(ok) as wf:
        await wf.trigger("shared")
        assert (await require(wf, "shared", S.DONE)).status is S.DONE


def test_cli_rejects_a_bad_pooler() -> None:
    result = subprocess.run(
        [PGFLOW, "migrate", "--pooler", "bogus"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "invalid choice: 'bogus'" in result.stderr


# -- LISTEN: a direct session, or polling with one clear log line ------------------------


async def test_without_a_listen_dsn_consumers_poll_and_say_so(
    pgflow_dsn: str, direct_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.delenv("PGFLOW_LISTEN_DSN")
    caplog.set_level(logging.WARNING, logger="pgflow.log.listener")
    b = _two_status_builder()
    client = b.build(pgflow_dsn)
    worker = _two_status_builder().build(pgflow_dsn)
    async with worker:
        lines = [r.getMessage() for r in caplog.records if "no LISTEN session" in r.getMessage()]
        assert len(lines) == 1 and "PGFLOW_LISTEN_DSN" in lines[0]
        await client.trigger("polled")
        assert (await require(client, "polled", S.DONE)).status is S.DONE
        async with await AsyncConnection.connect(direct_dsn) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND query ILIKE 'LISTEN%%'"
            )
            assert await cur.fetchone() == (0,)
    await client.close()


async def test_listen_dsn_gives_one_direct_listen_session(
    pgflow_dsn: str, direct_dsn: str, bouncer: PgBouncer
) -> None:
    async with _two_status_builder().build(pgflow_dsn) as wf:
        await wf.trigger("listened")
        await require(wf, "listened", S.DONE)
        async with await AsyncConnection.connect(direct_dsn) as conn:
            cur = await conn.execute(
                "SELECT client_port FROM pg_stat_activity WHERE datname = current_database()"
                " AND query ILIKE 'LISTEN%%'"
            )
            rows = await cur.fetchall()
    assert len(rows) == 1  # and not one of the bouncer's server connections:
    assert Connections.of(wf).listen_dsn == direct_dsn != pgflow_dsn


# -- pgflow worker: two processes through the bouncer ------------------------------------


def _worker(dsn: str, *extra: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PGFLOW, "worker", "tests.workflow_app:wf", "--dsn", dsn, *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_two_worker_processes_through_the_pooler(
    pgflow_dsn: str, direct_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.workflow_app import Status, make_builder

    async with await AsyncConnection.connect(direct_dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE effects (foreign_id text, step text, UNIQUE (foreign_id, step));"
            "CREATE TABLE effect_log (foreign_id text, step text)"
        )
    # The CLI flags, not the environment: --pooler / --listen-dsn.
    monkeypatch.delenv("PGFLOW_POOLER")
    monkeypatch.delenv("PGFLOW_LISTEN_DSN")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PGFLOW_LOG_LEVEL": "INFO"}
    flags = ("--pooler", "transaction", "--listen-dsn", direct_dsn)
    workers = [_worker(pgflow_dsn, *flags, env=env) for _ in range(2)]
    client = make_builder().build(pgflow_dsn, pooler="transaction")
    runs = 60
    try:
        for i in range(runs):
            await client.trigger(f"o{i}")
        for i in range(runs):
            await require(client, f"o{i}", Status.SHIPPED, timeout=60)
        async with await AsyncConnection.connect(direct_dsn) as conn:
            cur = await conn.execute(
                "SELECT count(*), count(DISTINCT (foreign_id, step)) FROM effect_log"
            )
            assert await cur.fetchone() == (3 * runs, 3 * runs)  # each step once, none twice
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND query ILIKE 'LISTEN%%'"
            )
            assert await cur.fetchone() == (2,)  # one direct LISTEN session per worker
    finally:
        await client.close()
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=30) for proc in workers]
    for proc, (out, err) in zip(workers, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert "running" in out and "stopping" in out
        assert "prepared statement" not in err and "no LISTEN session" not in err


def test_worker_without_a_listen_dsn_logs_the_polling_fallback(pgflow_dsn: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PGFLOW_LISTEN_DSN")
    proc = _worker(pgflow_dsn, env=env)
    try:
        assert proc.stdout is not None
        assert "running" in proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    [line] = [x for x in err.splitlines() if "no LISTEN session" in x]
    assert "WARNING pgflow.log.listener" in line and "polling" in line


# -- everything else that needed a session ------------------------------------------------


@pytest.fixture
def empty_pooled_dsn(pgflow_server: TestDatabases, bouncer: PgBouncer) -> Iterator[str]:
    """An empty database (no pgflow schema) through the bouncer."""
    name = f"{pgflow_server.prefix}_pooled_empty"
    ident = sql.Identifier(name)
    with psycopg.connect(pgflow_server.server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    try:
        yield bouncer.dsn_for(pgflow_server.dsn_for(name))
    finally:
        with psycopg.connect(pgflow_server.server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


async def test_concurrent_migrate_through_the_pooler_leaks_no_lock(
    empty_pooled_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGFLOW_POOLER", "transaction")
    results = await asyncio.gather(*(migrate(empty_pooled_dsn) for _ in range(3)))
    assert sorted(map(len, results)) == [0, 0, len(known_migrations())]  # exactly once
    direct = make_conninfo(
        "", **{**conninfo_to_dict(empty_pooled_dsn), "port": "5432", "host": "127.0.0.1"}
    )
    async with await AsyncConnection.connect(direct) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND d.datname = current_database()"
        )
        assert await cur.fetchone() == (0,)  # a session lock would be left on some session
    assert await migrate(empty_pooled_dsn) == []  # and the next migrate is not blocked


async def test_stuck_after_applies_through_the_pooler(
    pgflow_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = _two_status_builder().build(pgflow_dsn)
    await client.trigger("quiet-run")  # no worker runs: it stays at NEW
    await client.close()
    args = ["stuck", "--dsn", pgflow_dsn, "--pooler", "transaction", "--csv"]
    assert await asyncio.to_thread(main, [*args, "--after", "0 seconds"]) == 0
    assert "quiet-run" in capsys.readouterr().out  # idle for more than 0 seconds
    assert await asyncio.to_thread(main, args) == 0
    assert "quiet-run" not in capsys.readouterr().out  # the default is 15 minutes


# -- chaos through the bouncer -------------------------------------------------------------


@pytest.mark.slow  # a chaos run: kills workers for seconds
async def test_chaos_through_the_pooler(
    pgflow_dsn: str, direct_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers and client through pgbouncer, with no LISTEN session (they poll), so
    every connection ``pg_terminate_backend`` can pick in the test database is one of
    the bouncer's server connections. The test observes directly. chaos_run asserts
    every run completed exactly once (0 lost, 0 duplicated) and connections died."""
    monkeypatch.delenv("PGFLOW_LISTEN_DSN")
    await chaos_run(pgflow_dsn, tmp_path, observe_dsn=direct_dsn, runs=200, chaos_seconds=6)


# -- the listener proves notifications reach it (or says why not) -------------------------


async def _self_test(dsn: str, caplog: Any, timeout: float) -> tuple[bool, list[str]]:
    caplog.clear()
    listener = Listener(dsn)
    listener.probe_timeout = timeout
    await listener.start()
    try:
        assert listener._probe is not None
        await asyncio.wait_for(asyncio.shield(listener._probe), timeout + 10)
    finally:
        await listener.stop()
    warnings = [r.getMessage() for r in caplog.records if "test notification" in r.getMessage()]
    return listener.verified.is_set(), warnings


async def test_listener_self_test_passes_on_a_direct_session(direct_dsn: str, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="pgflow.log.listener")
    assert await _self_test(direct_dsn, caplog, 10.0) == (True, [])


async def test_listener_self_test_warns_through_a_transaction_pooler(
    pgflow_dsn: str, caplog: Any
) -> None:
    """LISTEN through the bouncer (the mistake: no listen_dsn, no PGFLOW_POOLER): the
    test notification never arrives, and the warning names the fix."""
    caplog.set_level(logging.WARNING, logger="pgflow.log.listener")
    for _ in range(5):  # not by luck: every attempt
        verified, warnings = await _self_test(pgflow_dsn, caplog, 1.0)
        assert not verified
        [line] = warnings
        assert "PGFLOW_POOLER=transaction" in line and "PGFLOW_LISTEN_DSN" in line


def test_sync_client_through_the_pooler(pgflow_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Django/Flask app's blocking client, configured by argument, not environment."""
    monkeypatch.delenv("PGFLOW_POOLER")
    with pgflow.sync.connect(_two_status_builder(), pgflow_dsn, pooler="transaction") as client:
        assert Connections.of(client.workflow).pooler == "transaction"
        for i in range(12):  # well past psycopg's prepare threshold of 5
            client.trigger(f"sync-{i}")
            assert client.latest(f"sync-{i}").status is S.NEW


# -- the option inside the DSN (one DATABASE_URL carries it) ------------------------------


@pytest.mark.parametrize(
    "dsn, libpq, pooler",
    [
        (
            "postgresql://u@h:6432/app?pgflow_pooler=transaction",
            "postgresql://u@h:6432/app",
            "transaction",
        ),
        (
            "postgresql://u@h/app?sslmode=require&pgflow_pooler=transaction&application_name=a+b",
            "postgresql://u@h/app?sslmode=require&application_name=a+b",  # not re-encoded
            "transaction",
        ),
        (
            "host=h port=6432 pgflow_pooler=transaction dbname=app",
            "host=h port=6432 dbname=app",
            "transaction",
        ),
        ("host=h pgflow_pooler = 'session'", "host=h", "session"),
        (
            "postgresql://u@h/app?options=-c%20x%3D1",
            "postgresql://u@h/app?options=-c%20x%3D1",
            None,
        ),
    ],
)
def test_pgflow_pooler_dsn_parameter_is_split_off(dsn: str, libpq: str, pooler: str | None) -> None:
    assert _db.split_pooler(dsn) == (libpq, pooler)
    _db.validate_dsn(dsn)  # accepted by pgflow, although libpq would refuse it


def test_a_bad_pgflow_pooler_in_the_dsn_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="pgflow_pooler in the DSN must be one of"):
        _two_status_builder().build("host=h pgflow_pooler=bogus")


async def test_pooler_given_in_the_dsn_alone(
    pgflow_dsn: str, direct_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No environment, no argument: ``pgflow_pooler=transaction`` in the DSN is enough
    for the workflow, its worker and the CLI (and never reaches libpq)."""
    monkeypatch.delenv("PGFLOW_POOLER")
    monkeypatch.delenv("PGFLOW_LISTEN_DSN")
    dsn = f"{pgflow_dsn} pgflow_pooler=transaction"
    async with _two_status_builder().build(dsn) as wf:
        assert Connections.of(wf).pooler == "transaction" and Connections.of(wf).listen_dsn is None
        for i in range(12):  # past psycopg's prepare threshold
            await wf.trigger(f"in-dsn-{i}")
        for i in range(12):
            await require(wf, f"in-dsn-{i}", S.DONE)
    assert await asyncio.to_thread(main, ["runs", "--dsn", dsn, "--csv"]) == 0
