"""The test kit behind :mod:`pgflow.testing` (see its docstring): databases per test,
the pytest fixtures (defined only when pytest is installed), and the luno-style helpers
that drive workflows. Import these names from ``pgflow.testing``, not from here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import importlib.util
import itertools
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgflow.errors import ConfigError, NotFound
from pgflow.ops.migrations import migrate
from pgflow.postgres import throwaway_cluster
from pgflow.workflow import clock as _clock
from pgflow.workflow._engine import maybe_await
from pgflow.workflow.records import RawRecord, Record, RunState
from pgflow.workflow.run import Run

if TYPE_CHECKING:  # pragma: no cover
    from pgflow.log.listener import Listener
    from pgflow.workflow.api import API
    from pgflow.workflow.workflow import Workflow

__all__ = ["TestDatabases", "pgflow_dsn", "pgflow_server", "run_sync", "server_dsn"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)

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


if importlib.util.find_spec("pytest") is not None:
    import pytest

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


class _Missing(enum.Enum):
    MISSING = 0


_MISSING = _Missing.MISSING


async def require(
    wf: API[T, S],
    foreign_id: str,
    status: S,
    expected: T | _Missing = _MISSING,
    *,
    timeout: float = 10.0,
) -> Record[T, S]:
    """Wait until the newest run of ``foreign_id`` has reached ``status``; its Record.
    With ``expected``, also assert that the run's object equals it (luno ``Require``).

    Works whether or not the run exists yet (a connector may still be triggering it).
    Raises ``TimeoutError`` naming where the run is after ``timeout`` seconds, and
    ``AssertionError`` showing both objects when they differ.
    """
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
        rec = await wf.wait_for(foreign_id, rec.run_id, status, timeout=remaining)
        if not isinstance(expected, _Missing) and rec.object != expected:
            raise AssertionError(
                f"{wf.name} / {foreign_id!r} at {getattr(status, 'name', status)}: object is\n"
                f"  {rec.object!r}\nexpected\n  {expected!r}"
            )
        return rec


async def wait_for(
    wf: API[T, S],
    foreign_id: str,
    predicate: Callable[[Record[T, S]], bool | Awaitable[bool]],
    *,
    timeout: float = 10.0,
) -> Record[T, S]:
    """Wait until ``predicate(record)`` of the newest run of ``foreign_id`` is true
    (luno ``WaitFor``); returns that record. ``TimeoutError`` says where the run is."""
    deadline = time.monotonic() + timeout
    last: Record[T, S] | None = None
    while True:
        try:
            last = await wf.latest(foreign_id)
            if await maybe_await(predicate(last)):
                return last
        except NotFound:
            pass
        if time.monotonic() > deadline:
            where = (
                f"{last.status.name}, {last.run_state}, object {last.object!r}"
                if last is not None
                else "no run"
            )
            raise TimeoutError(
                f"{wf.name} / {foreign_id!r}: predicate not true within {timeout}s (it is: {where})"
            )
        await asyncio.sleep(0.02)


async def trigger_callback_on(
    wf: API[T, S], foreign_id: str, status: S, payload: Any, *, timeout: float = 10.0
) -> Record[T, S] | None:
    """Wait until the newest run of ``foreign_id`` is at ``status``, then deliver
    ``payload`` to its callbacks (luno ``TriggerCallbackOn``); returns what
    ``wf.callback`` returns."""
    await require(wf, foreign_id, status, timeout=timeout)
    return await wf.callback(foreign_id, status, payload)


async def await_timeout_insert(
    wf: API[T, S], foreign_id: str, status: S, *, timeout: float = 10.0
) -> list[datetime]:
    """Wait until the newest run of ``foreign_id`` has its timeouts on ``status`` armed
    (luno ``AwaitTimeoutInsert``); returns their due times, in timer order. Then move a
    :class:`Clock` past them to fire them."""
    name = getattr(status, "name", str(status))
    rec = await require(wf, foreign_id, status, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        async with wf._read() as conn:
            cur = await conn.execute(
                "SELECT expire_at FROM pgflow.timeouts WHERE run_id = %s AND status = %s"
                " AND NOT completed ORDER BY timer",
                (rec.run_id, name),
            )
            rows = await cur.fetchall()
        if rows:
            return [r[0] for r in rows]
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{wf.name} / {foreign_id!r}: no timeout armed on {name} within {timeout}s"
            )
        await asyncio.sleep(0.02)


class Clock(_clock.Clock):
    """A clock a test moves by hand (luno ``WithClock``): pass it to
    ``Builder.build(..., clock=clock)`` and timeouts, step retries, pause retries and
    schedules all read it, so a 3-day timeout fires the moment the test says::

        clock = Clock()
        wf = b.build(dsn, clock=clock)
        ...
        await await_timeout_insert(wf, "order-1", Status.SHIPPED)
        clock.advance(timedelta(days=3))
        await require(wf, "order-1", Status.EXPIRED)

    Moving it wakes the workflow's timer poller at once. Step retries wait for it too:
    a failing step's next attempt comes when the clock passes its ``err_backoff``.
    Record times the database stamps (``created_at``, ``updated_at``) stay on the
    database's clock.
    """

    def __init__(self, start: datetime | None = None) -> None:
        now = start if start is not None else datetime.now(UTC)
        self._now = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
        self._callbacks: list[Callable[[], None]] = []

    def now(self) -> datetime:
        return self._now

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def advance(self, delta: timedelta | float) -> datetime:
        """Move forward by ``delta`` (a timedelta or seconds); returns the new time."""
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        if step < timedelta(0):
            raise ConfigError("a Clock only moves forward")
        return self.set(self._now + step)

    def set(self, when: datetime) -> datetime:
        """Jump to ``when`` (naive = UTC)."""
        self._now = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        for callback in list(self._callbacks):
            callback()
        return self._now


class TestingRun(Run[T, S]):
    """A :class:`pgflow.Run` without a database (luno ``NewTestingRun``): call a step
    function with it and look at what it did. ``pause``/``cancel``/``save_and_repeat``
    are recorded instead of written; ``run.tx`` raises (a step that writes SQL needs the
    ``pgflow_dsn`` fixture)."""

    __test__ = False

    def __init__(self, record: Record[T, S]) -> None:
        super().__init__(None, None, record, None)  # type: ignore[arg-type]
        #: ``(RunState, reason)`` for each ``pause``/``cancel`` the step made
        self.state_changes: list[tuple[RunState, str | None]] = []
        #: how many times the step called ``save_and_repeat``
        self.repeats = 0

    @property
    def tx(self) -> AsyncConnection[Any]:
        raise RuntimeError(
            "testing_run has no database: run.tx is unavailable (test this step against "
            "a real database with the pgflow_dsn fixture)"
        )

    async def pause(self, reason: str | None = None) -> None:
        self.state_changes.append((RunState.PAUSED, reason))
        self.changed = True

    async def cancel(self, reason: str | None = None) -> None:
        self.state_changes.append((RunState.CANCELLED, reason))
        self.changed = True

    async def save_and_repeat(self) -> None:
        self.repeats += 1
        self.changed = True

    def _moved(self, raw: RawRecord) -> None:  # pragma: no cover - nothing moves here
        raise RuntimeError("testing_run cannot move")


def testing_run(
    status: S,
    object: T,
    *,
    foreign_id: str = "test",
    run_id: str | None = None,
    run_state: RunState = RunState.RUNNING,
    workflow: str = "test",
    err_count: int = 0,
) -> TestingRun[T, S]:
    """A run at ``status`` carrying ``object``, to unit test one step function without a
    database: ``assert await my_step(testing_run(S.PAID, order)) == S.SHIPPED``."""
    now = datetime.now(UTC)
    record: Record[T, S] = Record(
        workflow_name=workflow,
        foreign_id=foreign_id,
        run_id=run_id or str(uuid.uuid4()),
        run_state=run_state,
        status=status,
        object=object,
        created_at=now,
        updated_at=now,
        err_count=err_count,
    )
    return TestingRun(record)


testing_run.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


async def require_state(wf: Any, foreign_id: str, run_state: Any, timeout: float = 10.0) -> Any:
    """Wait until the newest run of ``foreign_id`` is in ``run_state`` (a RunState)."""
    import time

    from pgflow.errors import NotFound

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


class Connections(NamedTuple):
    """How a built workflow connects (``build`` options, ``--pool-size``, ``$PGFLOW_*``)."""

    pool_size: int
    pooler: str  #: ``none``, ``session`` or ``transaction``
    listen_dsn: str | None  #: None: no LISTEN session, consumers poll
    listener: Listener | None  #: while running; one per process, shared by workflows

    @classmethod
    def of(cls, wf: Workflow[Any, Any]) -> Connections:
        """``wf``'s (tests of configuration need not reach into its engine)."""
        e = wf._engine
        return cls(e.pool_size, e.pooler, e.listen_dsn, e.listener)


__all__ += [
    "Clock",
    "Connections",
    "TestingRun",
    "await_timeout_insert",
    "require",
    "require_state",
    "testing_run",
    "trigger_and_require",
    "trigger_callback_on",
    "wait_for",
]
