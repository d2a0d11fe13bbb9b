"""Test helpers: a real, migrated, isolated PostgreSQL database per test.

Use it from your own tests with ``pytest_plugins = ["pgflow.testing"]`` in
``conftest.py``; the ``pgflow_dsn`` fixture then gives each test a fresh database
with the pgflow schema installed. Importing this module does not need pytest (the
fixtures are defined only when pytest is installed): the helpers below — ``require``,
``wait_for``, ``trigger_callback_on``, ``await_timeout_insert``, ``testing_run``,
:class:`Clock` — work from any test runner.

Which server: ``PGFLOW_TEST_DSN`` or ``DATABASE_URL`` when set; else a server on
127.0.0.1:5432 if one answers; else a throwaway cluster started for the session
(needs PostgreSQL's ``initdb``/``pg_ctl``). ``PGFLOW_TEST_THROWAWAY=1`` forces the
throwaway cluster. Each test database is cloned from a migrated template, which is
much faster than migrating every time.

:mod:`pgflow.testing.connectors` is the conformance suite for connectors: the checks
every shipped broker connector passes, to run against your own.
"""

from __future__ import annotations

from pgflow.testing import _kit
from pgflow.testing._kit import (
    LOCAL_DSN as LOCAL_DSN,  # not in __all__, importable as before
)
from pgflow.testing._kit import (
    Clock,
    TestDatabases,
    TestingRun,
    await_timeout_insert,
    require,
    require_state,
    run_sync,
    server_dsn,
    testing_run,
    trigger_and_require,
    trigger_callback_on,
    wait_for,
)

__all__ = [
    "Clock",
    "TestDatabases",
    "TestingRun",
    "await_timeout_insert",
    "pgflow_dsn",
    "pgflow_server",
    "require",
    "require_state",
    "run_sync",
    "server_dsn",
    "testing_run",
    "trigger_and_require",
    "trigger_callback_on",
    "wait_for",
]

# The fixtures exist only when pytest is installed (see the module doc); pytest finds
# them here, in the module named by ``pytest_plugins``.
if hasattr(_kit, "pgflow_dsn"):
    pgflow_dsn = _kit.pgflow_dsn
    pgflow_server = _kit.pgflow_server

del _kit
