"""Run-state reasons (luno ``Meta.RunStateReason``): API, Run, CLI, views."""

from __future__ import annotations

import enum
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow import RunState
from pgflow.cli import main
from pgflow.testing import require, require_state, run_sync


class S(enum.IntEnum):
    START = 1
    WAIT = 2
    DONE = 3


def waiting_workflow(dsn: str, **build: Any) -> pgflow.Workflow[dict[str, Any], S]:
    """START -> WAIT by a step; WAIT -> DONE only by callback (so runs sit at WAIT)."""
    b = pgflow.Builder("reasons", dict, S, polling_frequency=0.05)

    @b.step(S.START, to=[S.WAIT])
    async def start(run: pgflow.Run[dict[str, Any], S]) -> S:
        if run.object.get("pause_me"):
            return await run.pause("step saw pause_me")  # type: ignore[func-returns-value]
        if run.object.get("cancel_me"):
            return await run.cancel(reason="step saw cancel_me")  # type: ignore[func-returns-value]
        return S.WAIT

    b.add_callback(S.WAIT, lambda run, payload: S.DONE, S.DONE)
    return b.build(dsn, **build)


def runs_view(dsn: str, foreign_id: str) -> tuple[str, str | None]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT run_state, run_state_reason FROM pgflow.runs WHERE foreign_id = %s"
            " ORDER BY created_at DESC LIMIT 1",
            (foreign_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1]


async def test_api_reasons_are_stored_shown_and_cleared(pgflow_dsn: str) -> None:
    async with waiting_workflow(pgflow_dsn) as wf:
        await wf.trigger("a")
        await require(wf, "a", S.WAIT)
        rec = await wf.pause("a", reason="customer asked to hold")
        assert rec.run_state is RunState.PAUSED
        assert rec.run_state_reason == "customer asked to hold"
        assert (await wf.latest("a")).run_state_reason == "customer asked to hold"
        assert runs_view(pgflow_dsn, "a") == ("PAUSED", "customer asked to hold")
        # the reason explains the state it came with: a resume without one clears it
        rec = await wf.resume("a")
        assert rec.run_state_reason is None
        assert runs_view(pgflow_dsn, "a") == ("RUNNING", None)
        rec = await wf.cancel("a", reason="fraud suspected")
        assert (rec.run_state, rec.run_state_reason) == (RunState.CANCELLED, "fraud suspected")
        rec = await wf.delete_data("a", reason="GDPR request 42")
        assert (rec.run_state, rec.run_state_reason) == (RunState.DATA_DELETED, "GDPR request 42")
        assert runs_view(pgflow_dsn, "a") == ("DATA_DELETED", "GDPR request 42")
        # every change's reason is in the history too
        with psycopg.connect(pgflow_dsn) as conn:
            rows = conn.execute(
                "SELECT change, reason FROM pgflow.run_history WHERE foreign_id = 'a' ORDER BY step"
            ).fetchall()
        assert [r for r in rows if r[1]] == [
            ("pause", "customer asked to hold"),
            ("cancel", "fraud suspected"),
            ("delete_data", "GDPR request 42"),
            ("data_deleted", "GDPR request 42"),
        ]


async def test_run_pause_and_cancel_take_a_reason_and_a_step_move_clears_it(
    pgflow_dsn: str,
) -> None:
    async with waiting_workflow(pgflow_dsn) as wf:
        await wf.trigger("p", initial={"pause_me": True})
        await wf.trigger("c", initial={"cancel_me": True})
        rec = await require_state(wf, "p", RunState.PAUSED)
        assert rec.run_state_reason == "step saw pause_me"
        rec = await require_state(wf, "c", RunState.CANCELLED)
        assert rec.run_state_reason == "step saw cancel_me"
        await wf.trigger("r")
        await require(wf, "r", S.WAIT)
        await wf.pause("r", reason="hold")
        await wf.resume("r", reason="released by ops")
        assert (await wf.latest("r")).run_state_reason == "released by ops"
        # the callback completes the run: a new run state, so the old reason goes
        rec = await wf.callback("r", S.WAIT)
        assert rec is not None and rec.run_state is RunState.COMPLETED
        assert rec.run_state_reason is None
        assert runs_view(pgflow_dsn, "r") == ("COMPLETED", None)


async def test_automatic_pause_records_luno_reason(pgflow_dsn: str) -> None:
    b = pgflow.Builder("autopause", dict, S, polling_frequency=0.05)

    @b.step(S.START, to=[S.DONE], err_backoff=0.01, pause_after_err_count=2)
    async def boom(run: pgflow.Run[dict[str, Any], S]) -> S:
        raise RuntimeError("nope")

    async with b.build(pgflow_dsn) as wf:
        await wf.trigger("x")
        rec = await require_state(wf, "x", RunState.PAUSED)
        assert rec.run_state_reason == "max error retry threshold hit"
        assert rec.err_count == 2


def test_cli_reason_runs_and_show(pgflow_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def setup() -> None:
        async with waiting_workflow(pgflow_dsn) as wf:
            await wf.trigger("cli-1")
            await require(wf, "cli-1", S.WAIT)

    run_sync(setup())
    code = main(["pause", "cli-1", "--dsn", pgflow_dsn, "--reason", "ops: hold for audit"])
    out = capsys.readouterr().out
    assert code == 0 and "PAUSED" in out and "ops: hold for audit" in out
    assert runs_view(pgflow_dsn, "cli-1") == ("PAUSED", "ops: hold for audit")

    assert main(["runs", "--dsn", pgflow_dsn]) == 0
    out = capsys.readouterr().out
    assert "run_state_reason" in out.splitlines()[0]
    assert "ops: hold for audit" in out

    assert main(["show", "cli-1", "--dsn", pgflow_dsn]) == 0
    out = capsys.readouterr().out
    assert "run_state_reason  ops: hold for audit" in out
    assert "reason" in out and out.count("ops: hold for audit") == 2  # record + history

    assert main(["cancel", "cli-1", "--dsn", pgflow_dsn, "--reason", "abandoned"]) == 0
    capsys.readouterr()
    assert main(["delete-data", "cli-1", "--dsn", pgflow_dsn, "--reason", "erasure #7"]) == 0
    out = capsys.readouterr().out
    assert "REQUESTED_DATA_DELETED" in out and "erasure #7" in out
    assert runs_view(pgflow_dsn, "cli-1") == ("REQUESTED_DATA_DELETED", "erasure #7")


def test_reason_must_be_text(pgflow_dsn: str) -> None:
    async def go() -> None:
        async with waiting_workflow(pgflow_dsn) as wf:
            await wf.trigger("t")
            with pytest.raises(TypeError, match="reason must be a string"):
                await wf.pause("t", reason=42)  # type: ignore[arg-type]

    run_sync(go())
