"""Workflows in one process share one LISTEN connection (the fixed connection budget)."""

from __future__ import annotations

import psycopg

from pgflow.testing import Connections, require
from tests._util import wait_until
from tests.two_workflows_app import S, billing, shipping


def _listen_connections(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query ILIKE 'LISTEN%%'"
        ).fetchone()
        return int(row[0]) if row else 0


async def test_workflows_in_one_process_share_the_listener(pgflow_dsn: str) -> None:
    async with billing.build(pgflow_dsn) as one:
        async with shipping.build(pgflow_dsn) as two:
            assert Connections.of(one).listener is Connections.of(two).listener
            assert _listen_connections(pgflow_dsn) == 1
            await one.trigger("a")
            await two.trigger("b")
            await require(one, "a", S.DONE)
            await require(two, "b", S.DONE)
        # the second workflow stopped: the first still listens (and still progresses)
        listener = Connections.of(one).listener
        assert listener is not None and listener.connected
        await one.trigger("c")
        await require(one, "c", S.DONE)

    async def listener_closed() -> bool:  # the backend exits just after the close
        return _listen_connections(pgflow_dsn) == 0

    await wait_until(listener_closed, timeout=10, message="LISTEN connection closed")
