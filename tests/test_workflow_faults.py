"""One bad run never blocks the others (issue 9): poison objects, BaseException from
user code, timers under savepoints, hooks after commit, visible errors."""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from typing import Any

import pgflow
from pgflow import RunState
from pgflow.testing import require, require_state
from tests._util import wait_until


class S(enum.IntEnum):
    START = 1
    MIDDLE = 2
    END = 3
    EXPIRED = 4


async def _is(value: bool) -> bool:
    return value


async def test_poison_objects_fail_their_run_only(pgflow_dsn: str) -> None:
    """NaN, a NUL character or an unserialisable value left in a run's object becomes
    that run's recorded error; the batch-mates complete, their steps run once."""
    calls: Counter[str] = Counter()
    poison: dict[str, Any] = {
        "nan": float("nan"),
        "nul": "a\x00b",
        "obj": object(),
        "surrogate": "\ud800",  # the codec lets it through; jsonb refuses the batch's row
    }
    b = pgflow.Builder("poison", dict, S, polling_frequency=0.1)

    @b.step(S.START, to=[S.END], err_backoff=0.05, pause_after_err_count=2, batch_size=50)
    def work(run: pgflow.Run[dict[str, Any], S]) -> S:
        calls[run.foreign_id] += 1
        kind = run.foreign_id.split("-")[0]
        if kind in poison:
            run.object["bad"] = poison[kind]
        return S.END

    wf = b.build(pgflow_dsn)
    for kind in poison:
        await wf.trigger(f"{kind}-1")
    for i in range(20):
        await wf.trigger(f"good-{i}")
    async with wf:
        for i in range(20):
            rec = await require(wf, f"good-{i}", S.END)
            assert rec.run_state is RunState.COMPLETED
        for kind in poison:
            rec = await require_state(wf, f"{kind}-1", RunState.PAUSED)
            assert rec.err_count == 2, rec
            assert rec.last_error and rec.status is S.START
        assert all(calls[f"good-{i}"] == 1 for i in range(20)), calls
        assert all(calls[f"{kind}-1"] == 2 for kind in poison), calls
