"""pgflow.sync: the blocking client facade (from plain threads, as a web app would)."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgflow
import pgflow.sync
from pgflow import RunState
from pgflow.log.listener import CHANNEL
from tests.workflow_app import Status, make_builder

ROOT = Path(__file__).resolve().parent.parent


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


def test_sync_calls_the_hand_copy_lacked(pgflow_dsn: str) -> None:
    """get, poke, schedule/unschedule, trigger(headers=), run_id_for, name, list: the
    calls the generated facade gained (the hand-copied one drifted without them)."""
    with pgflow.sync.connect(make_builder(), pgflow_dsn) as client:
        assert client.name == "crashy"
        rid = client.run_id_for("shop", "ev-1")
        assert rid == client.workflow.run_id_for("shop", "ev-1")
        assert client.trigger("h1", run_id=rid, headers={"source": "shop"}) == rid
        assert client.trigger("h1", run_id=rid) == rid  # idempotent on the event
        rec = client.get("h1", rid)
        assert rec.run_id == rid and rec.status is Status.CREATED
        with pytest.raises(pgflow.NotFound):
            client.get("h1", client.run_id_for("other"))
        with psycopg.connect(pgflow_dsn) as conn:
            row = conn.execute(
                "SELECT headers->>'source' FROM pgflow.events WHERE run_id = %s", (rid,)
            ).fetchone()
        assert row == ("shop",)

        client.schedule("nightly", "0 3 * * *")
        assert client.unschedule("nightly") is True
        assert client.unschedule("nightly") is False
        with psycopg.connect(pgflow_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM pgflow.schedules").fetchone() == (0,)

        page = client.list(foreign_id="h1", limit=5)
        assert [r.run_id for r in page] == [rid] and page.after is None
        with pytest.raises(TypeError, match="unexpected keyword argument 'stauts'"):
            client.list(stauts=Status.CREATED)  # type: ignore[call-arg]
        assert "CREATED" in client.mermaid()

        # poke runs in the private loop: the notifier there sends a NOTIFY (poked from
        # the caller's thread, its asyncio event would not wake the sender)
        with psycopg.connect(pgflow_dsn, autocommit=True) as listen:
            listen.execute(f"LISTEN {CHANNEL}")
            list(listen.notifies(timeout=0.3))  # what the calls above sent, if late
            client.poke()
            got = [n.payload for n in listen.notifies(timeout=5, stop_after=1)]
        assert got == ["crashy"]


def test_sync_module_is_generated_and_current() -> None:
    """pgflow/sync.py is what tools/gen_sync.py writes from the async API today: an API
    change without a re-run (or a hand edit of sync.py) fails here, with the diff."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_sync.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "pgflow" / "sync.py").read_text()
    assert text.startswith("# generated by tools/gen_sync.py; do not edit")


def test_every_public_client_call_has_a_blocking_twin() -> None:
    """The generator's promise, checked from the outside: each public member of the
    async Workflow is in the facade with the same parameters, or excluded for a reason."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from gen_sync import EXCLUDED
    finally:
        sys.path.pop(0)
    for name, member in inspect.getmembers(pgflow.Workflow):
        if name.startswith("_") or name in EXCLUDED or not callable(member):
            continue
        twin = getattr(pgflow.sync.SyncWorkflow, name, None)
        assert twin is not None, f"pgflow.sync.SyncWorkflow lacks {name}"
        assert inspect.signature(twin).parameters == inspect.signature(member).parameters, name
