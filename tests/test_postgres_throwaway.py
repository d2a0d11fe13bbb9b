"""The throwaway-cluster path of pgflow.postgres (used when no server is configured)."""

from __future__ import annotations

from pgflow import migrate
from pgflow._db import connect
from pgflow.events import NewEvent, Position, append
from pgflow.migrations import check_schema
from pgflow.postgres import throwaway_cluster
from pgflow.streamer import Filter, read_batch
from pgflow.testing import run_sync


def test_throwaway_cluster_start_migrate_stop() -> None:
    with throwaway_cluster() as cluster:
        assert cluster.running()
        data_dir = cluster.data_dir
        applied = run_sync(migrate(cluster.dsn))
        assert applied

        async def use() -> list[int]:
            conn = await connect(cluster.dsn)
            try:
                await check_schema(conn)
                ids = await append(conn, [NewEvent("s", "t", "f")])
                await conn.commit()
                events = await read_batch(conn, Filter("s"), Position.start())
                assert [e.id for e in events] == ids
                return ids
            finally:
                await conn.close()

        assert run_sync(use()) == [1]
    assert not data_dir.exists()  # stopped and removed
