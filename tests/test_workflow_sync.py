"""pgflow.sync: the blocking client facade (from plain threads, as a web app would)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import pgflow
import pgflow.sync
from pgflow import RunState
from tests.workflow_app import Status, make_builder


def test_sync_facade_from_threads(pgflow_dsn: str) -> None:
    client = pgflow.sync.connect(make_builder(), pgflow_dsn)
    with client:
        run_id = client.trigger("s1")
        assert client.exists("s1") and not client.exists("s2")
        with pytest.raises(pgflow.WorkflowInProgress):
            client.trigger("s1")
        rec = client.latest("s1")
        assert rec.run_id == run_id and rec.status is Status.CREATED
        errors: list[BaseException] = []

        def from_thread(i: int) -> None:
            try:
                client.trigger(f"t{i}")
                client.pause(f"t{i}")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=from_thread, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert client.latest("t3").run_state is RunState.PAUSED
        assert client.resume("t3").run_state is RunState.RUNNING
        assert client.cancel("t3").run_state is RunState.CANCELLED
        with pytest.raises(pgflow.InvalidTransition):
            client.update_status("s1", Status.SHIPPED)
        assert client.update_status("s1", Status.CHARGED).status is Status.CHARGED
        rec = client.wait_for("s1", run_id, Status.CHARGED, timeout=5)
        assert rec.version == 2


def test_sync_facade_inside_a_running_loop(pgflow_dsn: str) -> None:
    async def main() -> Any:
        # A sync call from inside async code must not touch (or block on) this loop's pool.
        client = pgflow.sync.connect(make_builder(), pgflow_dsn)
        try:
            return client.trigger("inside")
        finally:
            client.close()

    assert asyncio.run(main())
