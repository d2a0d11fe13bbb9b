"""pause_retry: runs paused after too many errors resume by themselves (luno
``WithPauseRetry``); runs paused by hand do not."""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

import pgflow
from pgflow import RunState
from pgflow.testing import require, require_state
from tests._util import wait_until


class S(enum.IntEnum):
    START = 1
    OTHER = 2
    DONE = 3


def flaky_workflow(
    dsn: str,
    attempts: Counter[str],
    fail_until: int,
    step_retry: Any = "unset",
    err_backoff: float = 0.01,
    **build: Any,
) -> pgflow.Workflow[dict[str, Any], S]:
    b = pgflow.Builder("pr", dict, S, polling_frequency=0.05)
    options: dict[str, Any] = {"err_backoff": err_backoff, "pause_after_err_count": 2}
    if step_retry != "unset":
        options["pause_retry"] = step_retry

    @b.step(S.START, to=[S.DONE], **options)
    async def work(run: pgflow.Run[dict[str, Any], S]) -> S:
        attempts[run.foreign_id] += 1
        if attempts[run.foreign_id] <= fail_until:
            raise RuntimeError(f"attempt {attempts[run.foreign_id]}")
        return S.DONE

    b.add_step(S.OTHER, lambda run: S.DONE, S.DONE)
    return b.build(dsn, **build)


async def test_auto_paused_run_resumes_after_pause_retry(pgflow_dsn: str) -> None:
    attempts: Counter[str] = Counter()
    wf = flaky_workflow(pgflow_dsn, attempts, 3, pause_retry=timedelta(seconds=0.5))
    async with wf:
        await wf.trigger("a")
        rec = await require_state(wf, "a", RunState.PAUSED)
        assert rec.run_state_reason == "max error retry threshold hit"
        assert attempts["a"] == 2
        # paused, it blocks its foreign id ... until pause_retry resumes it
        with pytest.raises(pgflow.WorkflowInProgress):
            await wf.trigger("a")
        rec = await require(wf, "a", S.DONE)
        assert rec.run_state is RunState.COMPLETED
        assert attempts["a"] == 4  # 2 attempts, paused, resumed, fails once more, succeeds
        # completing frees the foreign id
        await wf.trigger("a")


async def test_pause_by_hand_is_never_resumed_automatically(pgflow_dsn: str) -> None:
    attempts: Counter[str] = Counter()
    wf = flaky_workflow(
        pgflow_dsn, attempts, 100, err_backoff=0.5, pause_retry=timedelta(seconds=0.2)
    )
    async with wf:
        await wf.trigger("auto")
        await wf.trigger("manual")

        async def failed_once() -> bool:
            return (await wf.latest("manual")).err_count == 1

        # paused by hand while its first failure's retry is pending (retry_at is set)
        await wait_until(failed_once, message="a first failure")
        await wf.pause("manual", reason="ops hold")
        await require_state(wf, "auto", RunState.PAUSED)
        await wait_until(
            lambda: _ge(attempts, "auto", 4), message="auto-paused run resumed and retried"
        )
        await asyncio.sleep(0.6)
        rec = await wf.latest("manual")
        assert (rec.run_state, rec.run_state_reason) == (RunState.PAUSED, "ops hold")
        before = attempts["manual"]
        await asyncio.sleep(0.4)
        assert attempts["manual"] == before


async def test_pause_retry_none_disables_and_step_option_overrides(pgflow_dsn: str) -> None:
    attempts: Counter[str] = Counter()
    # disabled at build: stays paused
    async with flaky_workflow(pgflow_dsn, attempts, 3, pause_retry=None) as wf:
        await wf.trigger("off")
        await require_state(wf, "off", RunState.PAUSED)
        await asyncio.sleep(1.0)
        rec = await wf.latest("off")
        assert rec.run_state is RunState.PAUSED and attempts["off"] == 2
        assert rec.run_state_reason == "max error retry threshold hit"
    # disabled at build, enabled for the step
    attempts.clear()
    wf = flaky_workflow(pgflow_dsn, attempts, 3, step_retry=0.3, pause_retry=None)
    async with wf:
        await wf.cancel("off")
        await wf.trigger("on")
        await require(wf, "on", S.DONE)
    # enabled at build, disabled for the step
    attempts.clear()
    wf = flaky_workflow(pgflow_dsn, attempts, 3, step_retry=None, pause_retry=0.2)
    async with wf:
        await wf.trigger("step-off")
        await require_state(wf, "step-off", RunState.PAUSED)
        await asyncio.sleep(0.8)
        assert (await wf.latest("step-off")).run_state is RunState.PAUSED


async def test_resume_reason_and_default(pgflow_dsn: str) -> None:
    attempts: Counter[str] = Counter()
    wf = flaky_workflow(pgflow_dsn, attempts, 2, pause_retry=0.2)
    assert wf.graph.steps[S.START].options.pause_retry == timedelta(seconds=0.2)
    assert flaky_workflow(pgflow_dsn, attempts, 0).graph.steps[
        S.START
    ].options.pause_retry == timedelta(hours=1)
    async with wf:
        await wf.trigger("r")
        await require_state(wf, "r", RunState.PAUSED)

        async def resumed() -> bool:
            return attempts["r"] >= 3

        await wait_until(resumed, message="resumed")
        rec = await require(wf, "r", S.DONE)
        assert rec.err_count == 0


def test_bad_pause_retry_is_a_build_error() -> None:
    b = pgflow.Builder("bad", dict, S)
    b.add_step(S.START, lambda run: S.DONE, S.DONE, pause_retry="soon")
    with pytest.raises(pgflow.BuildError, match="pause_retry must be a timedelta"):
        b.build("postgresql://x@127.0.0.1/x")
    b = pgflow.Builder("bad", dict, S)
    b.add_step(S.START, lambda run: S.DONE, S.DONE)
    with pytest.raises(pgflow.BuildError, match="pause_retry must be positive"):
        b.build("postgresql://x@127.0.0.1/x", pause_retry=timedelta(0))


async def _ge(counter: Counter[str], key: str, n: int) -> bool:
    return counter[key] >= n
