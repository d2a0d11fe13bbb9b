"""Test helpers: a real, migrated, isolated PostgreSQL database per test.

Use it from your own tests with ``pytest_plugins = ["pgflow.testing"]`` in
``conftest.py``; the ``pgflow_dsn`` fixture then gives each test a fresh database
with the pgflow schema installed.

Which server: ``PGFLOW_TEST_DSN`` or ``DATABASE_URL`` when set; else a server on
127.0.0.1:5432 if one answers; else a throwaway cluster started for the session
(needs PostgreSQL's ``initdb``/``pg_ctl``). ``PGFLOW_TEST_THROWAWAY=1`` forces the
throwaway cluster. Each test database is cloned from a migrated template, which is
much faster than migrating every time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .migrations import migrate
from .postgres import throwaway_cluster

__all__ = ["TestDatabases", "pgflow_dsn", "pgflow_server", "run_sync", "server_dsn"]

logger = logging.getLogger("pgflow.testing")

T = TypeVar("T")

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _reachable(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
        return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def server_dsn() -> Iterator[str]:
    """A DSN of a server the tests may create databases on (see module doc)."""
    if os.environ.get("PGFLOW_TEST_THROWAWAY") != "1":
        for var in ("PGFLOW_TEST_DSN", "DATABASE_URL"):
            if os.environ.get(var):
                yield os.environ[var]
                return
        if _reachable(LOCAL_DSN):
            yield LOCAL_DSN
            return
        logger.warning("no PostgreSQL configured or on 127.0.0.1:5432; starting a throwaway one")
    with throwaway_cluster() as cluster:
        yield cluster.dsn


class TestDatabases:
    """Creates migrated databases on a server by cloning one migrated template."""

    __test__ = False  # not a pytest test class
    _counter = itertools.count(1)

    def __init__(self, server: str) -> None:
        self.server = server
        self.prefix = f"pgflow_test_{os.getpid()}"
        self.template = f"{self.prefix}_template"
        self._template_ready = False

    def dsn_for(self, dbname: str) -> str:
        params = conninfo_to_dict(self.server)
        params["dbname"] = dbname
        return make_conninfo("", **params)

    def _admin(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.server, autocommit=True) as conn:
            conn.execute(statement)

    def _ensure_template(self) -> None:
        if self._template_ready:
            return
        name = sql.Identifier(self.template)
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        self._admin(sql.SQL("CREATE DATABASE {}").format(name))
        run_sync(migrate(self.dsn_for(self.template)))
        self._template_ready = True

    def create(self) -> str:
        """A fresh migrated database; returns its DSN."""
        self._ensure_template()
        dbname = f"{self.prefix}_{next(self._counter)}"
        self._admin(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(dbname), sql.Identifier(self.template)
            )
        )
        return self.dsn_for(dbname)

    def drop(self, dsn: str) -> None:
        dbname = conninfo_to_dict(dsn)["dbname"]
        self._admin(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(str(dbname)))
        )

    def close(self) -> None:
        if self._template_ready:
            self._admin(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.template)
                )
            )


@pytest.fixture(scope="session")
def pgflow_server() -> Iterator[TestDatabases]:
    """Session-wide access to a PostgreSQL server for creating test databases."""
    with server_dsn() as dsn:
        databases = TestDatabases(dsn)
        try:
            yield databases
        finally:
            databases.close()


@pytest.fixture
def pgflow_dsn(pgflow_server: TestDatabases) -> Iterator[str]:
    """The DSN of a fresh, migrated database, dropped after the test."""
    dsn = pgflow_server.create()
    try:
        yield dsn
    finally:
        pgflow_server.drop(dsn)


# -- driving workflows in tests (the workflow engine) ------------------------------------


async def require(wf: Any, foreign_id: str, status: Any, timeout: float = 10.0) -> Any:
    """Wait until the newest run of ``foreign_id`` has reached ``status``; its Record.

    Works whether or not the run exists yet (a connector may still be triggering it).
    Raises ``TimeoutError`` naming where the run is after ``timeout`` seconds.
    """
    import time

    from .errors import NotFound

    deadline = time.monotonic() + timeout
    while True:
        try:
            rec = await wf.latest(foreign_id)
        except NotFound:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no run of {foreign_id!r} appeared within {timeout}s") from None
            await asyncio.sleep(0.02)
            continue
        remaining = max(0.0, deadline - time.monotonic())
        return await wf.wait_for(foreign_id, rec.run_id, status, timeout=remaining)


async def require_state(wf: Any, foreign_id: str, run_state: Any, timeout: float = 10.0) -> Any:
    """Wait until the newest run of ``foreign_id`` is in ``run_state`` (a RunState)."""
    import time

    from .errors import NotFound

    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = await wf.latest(foreign_id)
            if last.run_state == run_state:
                return last
        except NotFound:
            pass
        if time.monotonic() > deadline:
            where = f"{last.status.name}, {last.run_state}" if last is not None else "no run"
            raise TimeoutError(
                f"run of {foreign_id!r} not {run_state} within {timeout}s (it is: {where})"
            )
        await asyncio.sleep(0.02)


async def trigger_and_require(
    wf: Any, foreign_id: str, status: Any, *, initial: Any = None, timeout: float = 10.0
) -> Any:
    """Trigger a run and wait until it reaches ``status``; returns its Record."""
    run_id = await wf.trigger(foreign_id, initial=initial)
    return await wf.wait_for(foreign_id, run_id, status, timeout=timeout)


__all__ += ["require", "require_state", "trigger_and_require"]
