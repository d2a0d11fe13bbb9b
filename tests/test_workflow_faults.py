"""One bad run never blocks the others (issue 9): poison objects, BaseException from
user code, timers under savepoints, hooks after commit, visible errors."""

from __future__ import annotations

import asyncio
import enum
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow import RunState
from pgflow.testing import require as _require
from pgflow.testing import require_state as _require_state
from tests._util import wait_until

PGFLOW = str(Path(sys.executable).with_name("pgflow"))


class S(enum.IntEnum):
    START = 1
    MIDDLE = 2
    END = 3
    EXPIRED = 4


# A shared, busy server: another session may hold the xid horizon back for seconds.
async def require(wf: Any, foreign_id: str, status: Any) -> Any:
    return await _require(wf, foreign_id, status, timeout=60)


async def require_state(wf: Any, foreign_id: str, state: Any) -> Any:
    return await _require_state(wf, foreign_id, state, timeout=60)


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


async def test_cancelled_error_from_a_step_is_that_runs_error(pgflow_dsn: str) -> None:
    """A step that awaits a cancelled task raises CancelledError: the run records the
    error and pauses after N; the shard's task lives on and later runs complete."""
    calls: Counter[str] = Counter()
    b = pgflow.Builder("cancelly", dict, S, polling_frequency=0.1)

    @b.step(S.START, to=[S.END], err_backoff=0.05, pause_after_err_count=2)
    async def work(run: pgflow.Run[dict[str, Any], S]) -> S:
        calls[run.foreign_id] += 1
        if run.foreign_id == "bad":
            task = asyncio.ensure_future(asyncio.sleep(10))
            task.cancel()
            await task
        return S.END

    async with b.build(pgflow_dsn) as wf:
        await wf.trigger("bad")
        rec = await require_state(wf, "bad", RunState.PAUSED)
        assert rec.err_count == 2 and rec.last_error
        assert rec.last_error.startswith("CancelledError")
        for i in range(5):
            await wf.trigger(f"good-{i}")
        for i in range(5):
            await require(wf, f"good-{i}", S.END)
        assert all(not t.done() for t in wf._tasks)


async def test_a_dying_consumer_task_is_logged_and_restarted(pgflow_dsn: str, caplog: Any) -> None:
    """Whatever kills a consumer loop (here: its after-batch callback raising, outside
    every handler's try), the supervisor logs the traceback and starts it again."""
    b = pgflow.Builder("phoenix", dict, S, polling_frequency=0.1)
    b.add_step(S.START, lambda run: S.END, S.END)
    async with b.build(pgflow_dsn) as wf:
        consumer = wf.consumers[0]
        original = consumer.on_batch
        deaths = Counter[str]()

        def explode(result: Any) -> None:
            if deaths["n"] < 2:
                deaths["n"] += 1
                raise RuntimeError("boom in on_batch")
            if original is not None:
                original(result)

        consumer.on_batch = explode
        for i in range(3):
            await wf.trigger(f"r{i}")
            await require(wf, f"r{i}", S.END)
        assert deaths["n"] == 2
        assert "task died; restarting" in caplog.text
        assert "boom in on_batch" in caplog.text
        assert not wf.failed.is_set()


async def test_worker_gives_up_and_fails_when_a_task_keeps_dying(pgflow_dsn: str) -> None:
    """A task that dies again and again makes serve() stop and raise WorkerFailed (the
    CLI exits 1); meanwhile its heartbeat row showed it, and says why it failed."""
    from pgflow.cli._worker import serve

    b = pgflow.Builder("doomed", dict, S, polling_frequency=0.1)
    b.add_step(S.START, lambda run: S.END, S.END)
    wf = b.build(pgflow_dsn)
    stop = asyncio.Event()
    server = asyncio.create_task(serve(wf, stop=stop, heartbeat_interval=0.2))
    await wait_until(lambda: _is(wf.running), timeout=60, message="worker running")

    async def workers() -> list[Any]:
        conn = await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True)
        async with conn:
            cur = await conn.execute("SELECT workflows, failure FROM pgflow.workers")
            return await cur.fetchall()

    rows = await wait_until(workers, timeout=60, message="heartbeat row")
    assert rows == [(["doomed"], None)]

    def explode(result: Any) -> None:
        raise RuntimeError("always")

    wf.consumers[0].on_batch = explode
    await wf.trigger("x")
    with pytest.raises(pgflow.WorkerFailed, match="died 5 times"):
        await asyncio.wait_for(server, 30)
    rows = await workers()
    assert len(rows) == 1 and "always" in rows[0][1]


def test_pgflow_workers_lists_live_workers(pgflow_dsn: str) -> None:
    conn = psycopg.connect(pgflow_dsn, autocommit=True)
    with conn:
        conn.execute(
            "INSERT INTO pgflow.workers (worker_id, host, pid, workflows, tasks, interval_s)"
            " VALUES (gen_random_uuid(), 'h1', 11, '{a,b}', 3, 5),"
            " (gen_random_uuid(), 'h2', 22, '{a}', 3, 5)"
        )
        conn.execute(
            "UPDATE pgflow.workers SET heartbeat_at = now() - interval '1 min' WHERE host = 'h2'"
        )
    out = subprocess.run(
        [PGFLOW, "workers", "--dsn", pgflow_dsn, "--csv"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0].startswith("host,pid,workflows,tasks,alive")
    assert lines[1].startswith('h1,11,"a, b",3,yes')
    assert lines[2].startswith("h2,22,a,3,no")


async def _app_table(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE app_effects (foreign_id text, what text)")


async def _effects(dsn: str) -> list[tuple[str, str]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT foreign_id, what FROM app_effects ORDER BY 1, 2")
        return await cur.fetchall()


async def test_expire_that_loses_the_race_commits_nothing(pgflow_dsn: str) -> None:
    """A callback moves the run while expire() runs: expire's run.tx writes must not
    commit ("refund sent" stored for a run that ended PAID)."""
    await _app_table(pgflow_dsn)
    b = pgflow.Builder("race", dict, S, polling_frequency=0.1)
    b.add_step(S.START, lambda run: S.MIDDLE, S.MIDDLE)
    b.add_callback(S.MIDDLE, lambda run, payload: S.END, S.END)
    holder: dict[str, Any] = {}

    async def expire(run: pgflow.Run[dict[str, Any], S], now: Any) -> S:
        await run.tx.execute(
            "INSERT INTO app_effects VALUES (%s, 'refund sent')", (run.foreign_id,)
        )
        await holder["wf"].callback(run.foreign_id, S.MIDDLE, {"paid": True})  # wins
        return S.EXPIRED

    b.add_timeout(S.MIDDLE, lambda run, now: now, expire, S.EXPIRED)
    async with b.build(pgflow_dsn) as wf:
        holder["wf"] = wf
        await wf.trigger("o1")
        rec = await require(wf, "o1", S.END)
        assert rec.run_state is RunState.COMPLETED
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            await wait_until(
                lambda: _all_timeouts_done(conn), timeout=60, message="timeout claimed"
            )
    assert await _effects(pgflow_dsn) == []


async def _all_timeouts_done(conn: psycopg.AsyncConnection[Any]) -> bool:
    cur = await conn.execute("SELECT bool_and(completed) FROM pgflow.timeouts")
    row = await cur.fetchone()
    return bool(row and row[0])


async def test_failing_timers_are_contained_retried_and_paused(pgflow_dsn: str) -> None:
    """A timer that writes then raises leaves no write; a timer whose SQL fails does
    not abort the arming batch (the other runs get their timers); failing timers are
    retried with backoff (without re-running the step) and pause the run after N."""
    await _app_table(pgflow_dsn)
    steps: Counter[str] = Counter()
    timers: Counter[str] = Counter()
    b = pgflow.Builder("timerfail", dict, S, polling_frequency=0.1)

    def step(run: pgflow.Run[dict[str, Any], S]) -> S:
        steps[run.foreign_id] += 1
        return S.MIDDLE

    b.add_step(S.START, step, S.MIDDLE)

    async def timer(run: pgflow.Run[dict[str, Any], S], now: Any) -> Any:
        timers[run.foreign_id] += 1
        if run.foreign_id == "writes-then-raises":
            await run.tx.execute("INSERT INTO app_effects VALUES (%s, 'armed')", (run.foreign_id,))
            raise RuntimeError("timer broke")
        if run.foreign_id == "bad-sql":
            await run.tx.execute("SELECT 1/0")
        if run.foreign_id == "flaky" and timers["flaky"] < 3:
            raise RuntimeError("not yet")
        return now

    b.add_timeout(
        S.MIDDLE,
        timer,
        lambda run, now: S.EXPIRED,
        S.EXPIRED,
        err_backoff=0.05,
        pause_after_err_count=3,
        batch_size=20,
    )
    # the MIDDLE step waits for the timer (no step at MIDDLE): re-arming must not
    # re-emit the run's MIDDLE event
    wf = b.build(pgflow_dsn)
    for fid in ("writes-then-raises", "bad-sql", "flaky", *[f"good-{i}" for i in range(5)]):
        await wf.trigger(fid)
    async with wf:
        for i in range(5):
            await require(wf, f"good-{i}", S.EXPIRED)
        rec = await require(wf, "flaky", S.EXPIRED)
        assert rec.err_count == 0
        for fid in ("writes-then-raises", "bad-sql"):
            rec = await require_state(wf, fid, RunState.PAUSED)
            assert rec.err_count == 3 and rec.status is S.MIDDLE, rec
            assert timers[fid] == 3
        assert "DivisionByZero" in (await wf.latest("bad-sql")).last_error
    assert await _effects(pgflow_dsn) == []
    assert all(n == 1 for n in steps.values()), steps
    assert timers["flaky"] == 3


async def test_a_failing_on_complete_hook_never_reruns_the_step(pgflow_dsn: str) -> None:
    """on_complete runs after commit: it fails twice, is retried, succeeds; the step that
    completed the run ran once, and the other runs' hooks ran too."""
    await _app_table(pgflow_dsn)
    steps: Counter[str] = Counter()
    hooks: Counter[str] = Counter()
    b = pgflow.Builder("hooky", dict, S, polling_frequency=0.1)

    @b.step(S.START, to=[S.END])
    async def work(run: pgflow.Run[dict[str, Any], S]) -> S:
        steps[run.foreign_id] += 1
        await run.tx.execute("INSERT INTO app_effects VALUES (%s, 'step')", (run.foreign_id,))
        return S.END

    @b.on_complete
    async def done(run: pgflow.Run[dict[str, Any], S]) -> None:
        hooks[run.foreign_id] += 1
        if run.foreign_id == "a" and hooks["a"] <= 2:
            raise RuntimeError("hook down")
        await run.tx.execute("INSERT INTO app_effects VALUES (%s, 'hook')", (run.foreign_id,))

    async with b.build(pgflow_dsn) as wf:
        for fid in ("a", "b", "c"):
            await wf.trigger(fid)
        for fid in ("a", "b", "c"):
            await require(wf, fid, S.END)
        await wait_until(
            lambda: _is(hooks["a"] == 3 and hooks["c"] >= 1), timeout=60, message="hooks"
        )
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:

            async def hook_rows() -> bool:
                cur = await conn.execute("SELECT count(*) FROM app_effects WHERE what = 'hook'")
                return (await cur.fetchone() or [0])[0] == 3

            await wait_until(hook_rows, timeout=60, message="three hook rows")
    assert steps == {"a": 1, "b": 1, "c": 1}
    assert sorted(await _effects(pgflow_dsn)) == sorted(
        [(f, w) for f in "abc" for w in ("hook", "step")]
    )


async def test_in_transaction_hook_is_atomic_with_the_completion(pgflow_dsn: str) -> None:
    calls: Counter[str] = Counter()
    b = pgflow.Builder("hooktx", dict, S, polling_frequency=0.1)

    @b.step(S.START, to=[S.END], err_backoff=0.05)
    def work(run: pgflow.Run[dict[str, Any], S]) -> S:
        calls["step"] += 1
        return S.END

    @b.on_complete(in_transaction=True)
    def done(run: pgflow.Run[dict[str, Any], S]) -> None:
        calls["hook"] += 1
        if calls["hook"] == 1:
            raise RuntimeError("roll the completion back")

    async with b.build(pgflow_dsn) as wf:
        await wf.trigger("x")
        rec = await require(wf, "x", S.END)
        assert rec.run_state is RunState.COMPLETED
    assert calls == {"step": 2, "hook": 2}


async def test_callback_for_a_paused_run_is_refused_not_dropped(pgflow_dsn: str) -> None:
    """A callback that arrives while its run is paused raises RunPaused (the caller keeps
    it); delivered again after resume, it moves the run — the step is not needed again."""
    sent: Counter[str] = Counter()
    b = pgflow.Builder("paycb", dict, S, polling_frequency=0.1)

    @b.step(S.START, to=[S.MIDDLE])
    def request(run: pgflow.Run[dict[str, Any], S]) -> S:
        sent[run.foreign_id] += 1
        return S.MIDDLE

    b.add_callback(S.MIDDLE, lambda run, payload: S.END if payload["ok"] else None, S.END)
    async with b.build(pgflow_dsn) as wf:
        await wf.trigger("p1")
        await require(wf, "p1", S.MIDDLE)
        await wf.pause("p1")
        with pytest.raises(pgflow.RunPaused, match="paused at MIDDLE"):
            await wf.callback("p1", S.MIDDLE, {"ok": True})
        rec = await wf.latest("p1")
        assert rec.status is S.MIDDLE and rec.run_state is RunState.PAUSED
        await wf.resume("p1")
        rec = await wf.callback("p1", S.MIDDLE, {"ok": True})
        assert rec is not None and rec.status is S.END
        assert rec.run_state is RunState.COMPLETED
        # a late duplicate for a finished run is still a quiet no-op
        assert await wf.callback("p1", S.MIDDLE, {"ok": True}) is None
    assert sent["p1"] == 1


async def test_run_id_for_is_namespaced_by_workflow(pgflow_dsn: str) -> None:
    """Two workflows on one source, both using the documented idempotent-trigger
    pattern: each gets its own run per event, nothing is dead-lettered. The old
    global pattern now fails with a message that names the fix."""
    from pgflow.connectors.memory import Connector as MemoryConnector
    from pgflow.connectors.memory import event

    source = MemoryConnector([event(f"e{i}", f"o{i}", "order.created") for i in range(10)])

    def shop(name: str, namespaced: bool) -> pgflow.Workflow[dict[str, Any], S]:
        b = pgflow.Builder(name, dict, S, polling_frequency=0.05)
        b.add_step(S.START, lambda run: S.END, S.END)

        async def handle(api: pgflow.API[dict[str, Any], S], ev: Any) -> None:
            rid = api.run_id_for("shop", ev.id) if namespaced else pgflow.run_id_for("shop", ev.id)
            await api.trigger(ev.foreign_id, run_id=rid)

        b.add_connector("orders", source, handle, max_retries=1, polling_frequency=0.05)
        return b.build(pgflow_dsn)

    billing, shipping = shop("billing", True), shop("shipping", True)
    async with billing, shipping:
        for wf in (billing, shipping):
            for i in range(10):
                rec = await require(wf, f"o{i}", S.END)
                assert rec.run_id == wf.run_id_for("shop", f"e{i}")
                assert rec.run_state is RunState.COMPLETED
    legacy_a, legacy_b = shop("legacy-a", False), shop("legacy-b", False)
    async with legacy_a:
        await require(legacy_a, "o9", S.END)
    async with legacy_b, await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:

        async def dead() -> list[Any]:
            cur = await conn.execute(
                "SELECT reason FROM pgflow.dead_letters WHERE consumer LIKE 'legacy-b%'"
            )
            return await cur.fetchall()

        rows = await wait_until(dead, timeout=60, message="dead letters")
    assert "api.run_id_for" in rows[0][0], rows
    async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgflow.dead_letters WHERE consumer NOT LIKE 'legacy-b%'"
        )
        assert await cur.fetchone() == (0,)


def _outbox_workflow(
    dsn: str, parallel_count: int, calls: Counter[str]
) -> pgflow.Workflow[dict[str, Any], S]:
    b = pgflow.Builder("outbox", dict, S, polling_frequency=0.05)

    @b.step(S.START, to=[S.END], parallel_count=parallel_count)
    async def request(run: pgflow.Run[dict[str, Any], S]) -> S | None:
        calls[run.foreign_id] += 1
        await run.tx.execute("INSERT INTO app_effects VALUES (%s, 'request')", (run.foreign_id,))
        return None  # wait for the callback

    b.add_callback(S.START, lambda run, payload: S.END, S.END)
    return b.build(dsn)


async def _count_effects(dsn: str, prefix: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM app_effects WHERE foreign_id LIKE %s", (prefix + "%",)
        )
        return int((await cur.fetchone() or [0])[0])


async def test_a_waiting_step_runs_once_per_version_across_layouts(pgflow_dsn: str) -> None:
    """A step that wrote through run.tx and returned None (waiting for a callback) is
    not run again when its event is read again: after parallel_count 1 -> 2 (a new
    layout reads from the start), with both layouts running at once, and after the
    cursor rows were deleted."""
    await _app_table(pgflow_dsn)
    calls: Counter[str] = Counter()

    async def probe(wf: pgflow.Workflow[dict[str, Any], S], tag: str) -> None:
        # events are read in order per shard: once fresh probes on every shard are
        # handled, the older events before them were read (again) too
        for i in range(8):
            await wf.trigger(f"{tag}-{i}")

        async def seen() -> bool:
            return await _count_effects(pgflow_dsn, tag) == 8

        await wait_until(seen, timeout=60, message=f"{tag} probes handled")

    async with _outbox_workflow(pgflow_dsn, 1, calls) as wf:
        for i in range(4):
            await wf.trigger(f"o{i}")
        await probe(wf, "p1")
    async with (
        _outbox_workflow(pgflow_dsn, 2, calls) as wf2,
        _outbox_workflow(pgflow_dsn, 1, calls) as wf1,  # a rolling deploy: both layouts
    ):
        await probe(wf2, "p2")
        await probe(wf1, "p3")
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM pgflow.cursors WHERE consumer = 'outbox/START'")
    async with _outbox_workflow(pgflow_dsn, 2, calls) as wf:
        await probe(wf, "p4")
        assert await _count_effects(pgflow_dsn, "o") == 4
        assert all(calls[f"o{i}"] == 1 for i in range(4)), calls
        # the runs still move on their callback
        rec = await wf.callback("o0", S.START, None)
        assert rec is not None and rec.status is S.END


async def test_hooks_skip_events_from_before_the_upgrade(pgflow_dsn: str) -> None:
    """Runs completed by the old code (which ran hooks in the transaction, before
    migration 0006 set pgflow.hooks_from) do not get their hooks fired again."""
    done: list[str] = []

    def flow(with_hook: bool) -> pgflow.Workflow[dict[str, Any], S]:
        b = pgflow.Builder("upgrade", dict, S, polling_frequency=0.05)
        b.add_step(S.START, lambda run: S.END, S.END)
        if with_hook:
            b.on_complete(lambda run: done.append(run.foreign_id))
        return b.build(pgflow_dsn)

    async with flow(False) as old:
        await old.trigger("before")
        await require(old, "before", S.END)
    async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE pgflow.hooks_from SET event_id = (SELECT max(id) FROM pgflow.events)"
        )
    async with flow(True) as new:
        await new.trigger("after")
        await require(new, "after", S.END)
        await wait_until(lambda: _is(done == ["after"]), timeout=60, message="on_complete")
        await asyncio.sleep(0.3)
    assert done == ["after"]
