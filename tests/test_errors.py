"""Errors carry what their message says as attributes, set at the real raise sites.

Code that handles ``NotFound`` or ``WorkflowInProgress`` should not parse messages to
learn which run it was about; these tests raise each error through the public API on
a real database and read the attributes back.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

import pgflow
from pgflow import RunState


class S(enum.IntEnum):
    NEW = 1
    WAITING = 2
    DONE = 3


def _builder() -> pgflow.Builder[dict[str, Any], S]:
    b: pgflow.Builder[dict[str, Any], S] = pgflow.Builder("errs", dict, S)
    b.add_step(S.NEW, lambda run: S.WAITING, S.WAITING)
    b.add_callback(S.WAITING, lambda run, payload: S.DONE, S.DONE)
    return b


@pytest.fixture
async def wf(pgflow_dsn: str) -> AsyncIterator[pgflow.Workflow[dict[str, Any], S]]:
    # A pool of one, still opening: the notifier's cancellation used to be swallowed
    # inside the pool here, and close() hung forever (Notifier.stop now also sets a flag).
    async with AsyncConnectionPool(pgflow_dsn, min_size=1, open=False) as pool:
        workflow = _builder().build(pool)  # not running: runs stay where they start
        try:
            yield workflow
        finally:
            await workflow.close()


async def test_not_found_names_what_was_looked_for(wf: pgflow.Workflow[Any, S]) -> None:
    with pytest.raises(pgflow.NotFound, match="no run for foreign id 'nobody'") as info:
        await wf.latest("nobody")
    assert (info.value.workflow, info.value.foreign_id, info.value.run_id) == (
        "errs",
        "nobody",
        None,
    )
    rid = uuid.uuid4()
    with pytest.raises(pgflow.NotFound) as info:
        await wf.get("nobody", rid)
    assert info.value.run_id == str(rid) and info.value.foreign_id == "nobody"


async def test_workflow_in_progress_names_the_active_run(wf: pgflow.Workflow[Any, S]) -> None:
    first = await wf.trigger("a")
    with pytest.raises(pgflow.WorkflowInProgress, match="already has a run in progress") as info:
        await wf.trigger("a")
    assert (info.value.workflow, info.value.foreign_id, info.value.run_id) == ("errs", "a", first)


async def test_invalid_transition_names_the_statuses(wf: pgflow.Workflow[Any, S]) -> None:
    rid = await wf.trigger("a")
    with pytest.raises(pgflow.InvalidTransition, match="NEW -> DONE is not allowed") as info:
        await wf.update_status("a", S.DONE)
    err = info.value
    assert (err.workflow, err.foreign_id, err.run_id) == ("errs", "a", rid)
    assert (err.from_status, err.to_status, err.run_state) == (S.NEW, S.DONE, None)


async def test_paused_run_refuses_with_its_run_state(wf: pgflow.Workflow[Any, S]) -> None:
    rid = await wf.trigger("b", start_at=S.WAITING)
    await wf.pause("b")
    with pytest.raises(pgflow.RunPaused, match="is paused at WAITING") as paused:
        await wf.callback("b", S.WAITING, {"paid": True})
    assert paused.value.run_id == rid and paused.value.to_status is S.WAITING
    assert paused.value.run_state is RunState.PAUSED
    with pytest.raises(pgflow.InvalidTransition, match="cannot pause run") as again:
        await wf.pause("b")  # pgflow.workflow.actions: the run state is why
    assert (again.value.run_id, again.value.run_state) == (rid, RunState.PAUSED)


def test_build_error_lists_every_problem() -> None:
    b: pgflow.Builder[dict[str, Any], S] = pgflow.Builder("", dict, S)
    b.add_step(S.NEW, "not callable", S.DONE)  # type: ignore[arg-type]
    with pytest.raises(pgflow.BuildError) as info:
        b.build("postgresql://postgres@127.0.0.1:5432/unused")
    assert info.value.workflow == ""
    assert len(info.value.problems) >= 2
    assert str(info.value) == "workflow '': " + "; ".join(info.value.problems)


def test_config_errors_are_still_value_errors() -> None:
    """Bad options raise ConfigError, which code catching ValueError still catches."""
    with pytest.raises(ValueError, match="must not be negative") as info:
        pgflow.timers.after(-1)
    assert isinstance(info.value, pgflow.ConfigError)
    with pytest.raises(pgflow.ConfigError, match="shard 2 of 2 is out of range"):
        pgflow.Filter("orders", shard=2, shard_count=2)
