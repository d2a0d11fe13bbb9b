"""Chaos: a multi-step workflow keeps its guarantees while processes and connections die.

Three ``pgflow worker tests.chaos_app:wf`` subprocesses run a three-step workflow
(every step writes an app row through ``run.tx``; some steps fail on purpose and are
retried) while the test triggers a few hundred runs and a seeded chaos loop, every
0.2-0.8 s, does one of:

* SIGKILL a random worker and start a replacement (in-flight batches die mid-way);
* SIGTERM one (graceful: batches in flight finish) and start a replacement;
* ``pg_terminate_backend()`` a random client connection of the test database — a
  worker's pooled or LISTEN connection, or the triggering client's.

After a bounded chaos phase the fleet (still three workers) must finish every run.
Then: every run COMPLETED at version 4 (no pause, no doubled transition) with no error
left; every step's effect exists exactly once (unique table, and a constraint-free log
that would show a second committed application); one non-retry event per (run,
status); the retry path was exercised; no run is stuck; every consumer caught up; every
gracefully stopped worker exited 0; and no cursor sampled during the whole test ever
moved backwards.

Seeded: the seed is printed (``-s`` or a failure shows it) and ``PGFLOW_CHAOS_SEED``
replays the same chaos plan and failure plan (timings still differ from run to run, so
a replay is likely, not certain, to hit the same interleaving). ``PGFLOW_CHAOS_RUNS`` /
``PGFLOW_CHAOS_SECONDS`` scale it. ~25-35 s on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg.conninfo import make_conninfo

from pgflow.log.snapshots import CONSUMED
from pgflow.workflow.api import run_id_for
from tests import chaos_app
from tests._util import wait_until

# kills worker processes and connections for seconds: ~12 s
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("PGFLOW_CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))
RUNS = int(os.environ.get("PGFLOW_CHAOS_RUNS", "500"))
CHAOS_SECONDS = float(os.environ.get("PGFLOW_CHAOS_SECONDS", "10"))
WORKERS = 3
#: application_name of the test's own observer connections (sampler, chaos, checks):
#: the chaos loop never terminates these, so what they observe can be trusted
OBSERVER = "pgflow-chaos-observer"

Conn = AsyncConnection[Any]
CursorId = tuple[str, int, int]  # (consumer, shard, shard_count)


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    #: SIGTERM sent; ready_when_signalled: it had started serving (handlers installed)
    terminated: bool = False
    ready_when_signalled: bool = False

    def ready(self) -> bool:
        return b"running" in self.out.read_bytes()


class Fleet:
    """The worker subprocesses; output goes to files (a full pipe would block a worker)."""

    def __init__(self, dsn: str, logs: Path) -> None:
        self.dsn = dsn
        self.logs = logs
        self.workers: list[Worker] = []

    def start(self) -> Worker:
        name = f"w{len(self.workers) + 1}"
        env = {
            **os.environ,
            "PGFLOW_DATABASE_URL": make_conninfo(self.dsn, application_name=f"chaos-{name}"),
            "PYTHONPATH": str(ROOT),
            "PGFLOW_CHAOS_SEED": str(SEED),
            "PGFLOW_LOG_LEVEL": "INFO",
        }
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "pgflow"), "worker", "tests.chaos_app:wf"],
                cwd=ROOT,
                env=env,
                stdout=o,
                stderr=e,
            )
        worker = Worker(name, proc, out, err)
        self.workers.append(worker)
        return worker

    def serving(self) -> list[Worker]:
        """Alive and not asked to stop."""
        return [w for w in self.workers if w.proc.poll() is None and not w.terminated]

    def kill_all(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
        for w in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(timeout=10)


async def observer(dsn: str) -> Conn:
    return await AsyncConnection.connect(
        make_conninfo(dsn, application_name=OBSERVER), autocommit=True
    )


async def scalar(conn: Conn, sql: str, params: tuple[Any, ...] = ()) -> Any:
    cur = await conn.execute(sql, params)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def test_chaos_kills_processes_and_connections(pgflow_dsn: str, tmp_path: Path) -> None:
    await chaos_run(pgflow_dsn, tmp_path)


async def chaos_run(
    pgflow_dsn: str,
    tmp_path: Path,
    *,
    observe_dsn: str | None = None,
    runs: int = RUNS,
    chaos_seconds: float = CHAOS_SECONDS,
) -> None:
    """The chaos test on ``pgflow_dsn`` (workers and client); the test's own observer
    connections use ``observe_dsn`` (default: the same; tests/test_pooled.py runs the
    workers through pgbouncer and observes directly)."""
    observe_dsn = observe_dsn or pgflow_dsn
    print(f"\nPGFLOW_CHAOS_SEED={SEED} runs={runs} chaos={chaos_seconds}s logs={tmp_path}")
    why = f"(PGFLOW_CHAOS_SEED={SEED}, worker logs in {tmp_path})"
    rng = random.Random(SEED)
    fleet = Fleet(pgflow_dsn, tmp_path)
    admin = await observer(observe_dsn)
    await admin.execute(chaos_app.APP_TABLES)
    client = chaos_app.make_builder().build(
        make_conninfo(pgflow_dsn, application_name="chaos-client"), pool_size=4
    )

    # -- cursor sampler: every position seen, per (consumer, shard) -------------------
    # A position is measured by how many events of its stream it has read: a cursor
    # that moved backwards would have read fewer (nothing is pruned here).
    history: dict[CursorId, list[int]] = defaultdict(list)
    backwards: list[str] = []

    async def sample(conn: Conn) -> None:
        cur = await conn.execute(
            "SELECT c.consumer, c.shard, c.shard_count, (SELECT count(*) FROM pgflow.events e"
            f" WHERE e.stream = c.stream AND {CONSUMED}) FROM pgflow.cursors c"
        )
        for consumer, shard, count, read in await cur.fetchall():
            key, pos = (consumer, shard, count), int(read)
            seen = history[key]
            if seen and pos < seen[-1]:
                backwards.append(f"{key}: {seen[-1]} -> {pos}")
            if not seen or pos != seen[-1]:
                seen.append(pos)

    async def sampler() -> None:
        async with await observer(observe_dsn) as conn:
            while True:
                await sample(conn)
                await asyncio.sleep(0.03)

    # -- triggers: paced over the chaos phase, retried when their connection dies --
    trigger_retries = 0

    async def trigger(i: int) -> None:
        nonlocal trigger_retries
        foreign_id = f"c{i:04d}"
        run_id = run_id_for("chaos", foreign_id)  # idempotent: a retry after a lost
        for attempt in range(100):  # commit acknowledgement returns the same run
            try:
                await client.trigger(foreign_id, run_id=run_id)
                return
            except psycopg.OperationalError:
                trigger_retries += 1
                await asyncio.sleep(0.01 * min(attempt + 1, 10))
        raise AssertionError(f"trigger of {foreign_id} kept failing {why}")

    async def triggers() -> None:
        start = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        for i in range(runs):
            lag = start + i * chaos_seconds / runs - time.monotonic()
            if lag > 0:
                await asyncio.sleep(lag)  # the workload's arrival rate
            task = asyncio.create_task(trigger(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if len(pending) >= 8:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)

    # -- chaos ---------------------------------------------------------------------------
    actions: Counter[str] = Counter()
    terminated_conns: Counter[str] = Counter()

    def pick_victim() -> Worker:
        # A worker that is serving (so probably mid-batch) rather than one still booting.
        serving = fleet.serving()
        return rng.choice([w for w in serving if w.ready()] or serving)

    async def sigkill() -> None:
        w = pick_victim()
        w.proc.kill()
        await asyncio.to_thread(w.proc.wait)
        fleet.start()

    async def sigterm() -> None:
        w = pick_victim()
        w.ready_when_signalled = w.ready()
        w.terminated = True
        w.proc.terminate()  # it finishes its batches while the replacement starts
        fleet.start()

    async def terminate_backend(conn: Conn) -> None:
        cur = await conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend' AND application_name <> %s ORDER BY pid",
            (OBSERVER,),
        )
        rows = await cur.fetchall()
        if not rows:
            return
        pid, app = rng.choice(rows)
        if await scalar(conn, "SELECT pg_terminate_backend(%s)", (pid,)):
            terminated_conns[app] += 1

    async def chaos() -> None:
        kinds = ["sigkill", "sigterm", "terminate"]
        first = rng.sample(kinds, len(kinds))  # every kind happens at least once
        async with await observer(observe_dsn) as conn:
            deadline = time.monotonic() + chaos_seconds
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(0.2, 0.8))  # chaos pacing
                kind = first.pop(0) if first else rng.choices(kinds, weights=[3, 2, 5])[0]
                actions[kind] += 1
                if kind == "sigkill":
                    await sigkill()
                elif kind == "sigterm":
                    await sigterm()
                else:
                    await terminate_backend(conn)

    tasks: list[asyncio.Task[None]] = []
    try:
        for _ in range(WORKERS):
            fleet.start()
        sampler_task = asyncio.create_task(sampler())
        trigger_task = asyncio.create_task(triggers())
        chaos_task = asyncio.create_task(chaos())
        tasks += [sampler_task, trigger_task, chaos_task]

        await chaos_task
        await asyncio.wait_for(trigger_task, timeout=30)
        chaos_end = time.monotonic()
        done_in_chaos = await scalar(
            admin, "SELECT count(*) FROM pgflow.records WHERE run_state = 'COMPLETED'"
        )
        assert len(fleet.serving()) >= 2, why

        async def completed() -> bool:
            n = await scalar(
                admin, "SELECT count(*) FROM pgflow.records WHERE run_state = 'COMPLETED'"
            )
            return bool(n == runs)

        try:
            await wait_until(completed, timeout=45, interval=0.1, message=f"all runs {why}")
        except AssertionError:
            cur = await admin.execute(
                "SELECT status, run_state, err_count, left(last_error, 200), count(*)"
                " FROM pgflow.records WHERE run_state <> 'COMPLETED' GROUP BY 1, 2, 3, 4"
            )
            raise AssertionError(f"runs not completed {why}: {await cur.fetchall()}") from None

        completed_after = time.monotonic() - chaos_end

        async def caught_up() -> bool:
            return bool(
                await scalar(admin, "SELECT coalesce(sum(lag_events), 0) FROM pgflow.consumer_lag")
                == 0
            )

        await wait_until(caught_up, timeout=10, interval=0.05, message=f"consumers caught up {why}")
        sampler_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler_task
        await sample(admin)  # the final positions too

        # Gracefully stopped workers finish their batches and exit 0.
        for w in fleet.workers:
            if w.terminated:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(w.proc.wait, 30)
        for w in fleet.workers:
            if w.terminated and w.ready_when_signalled:
                assert w.proc.returncode == 0, (
                    f"{w.name} exited {w.proc.returncode} after SIGTERM {why}:\n"
                    + w.err.read_text()[-3000:]
                )
                assert "stopping" in w.out.read_text(), f"{w.name} {why}"

        # -- invariants ------------------------------------------------------------------
        cur = await admin.execute(
            "SELECT count(*) FILTER (WHERE status = 'SHIPPED' AND run_state = 'COMPLETED'"
            "   AND version = 4 AND err_count = 0 AND last_error IS NULL AND retry_at IS NULL),"
            " count(*) FROM pgflow.records WHERE workflow = 'chaos'"
        )
        clean, total = await cur.fetchone() or (0, 0)
        assert (clean, total) == (runs, runs), f"runs: {clean} clean of {total} {why}"

        expected = {(f"c{i:04d}", step) for i in range(runs) for step in chaos_app.STEPS}
        cur = await admin.execute("SELECT foreign_id, step FROM chaos_effects")
        effects = await cur.fetchall()
        assert len(effects) == len(expected) and set(effects) == expected, f"effects {why}"
        cur = await admin.execute(
            "SELECT foreign_id, step, count(*) FROM chaos_effect_log GROUP BY 1, 2"
            " HAVING count(*) > 1"
        )
        doubled = await cur.fetchall()
        assert doubled == [], f"effects committed twice {why}: {doubled[:10]}"
        assert await scalar(admin, "SELECT count(*) FROM chaos_effect_log") == len(expected), why

        # One trigger/step event per (run, status): no transition was applied twice.
        cur = await admin.execute(
            "SELECT type, count(*), count(DISTINCT run_id) FROM pgflow.events"
            " WHERE stream = 'chaos' AND headers->>'change' IS DISTINCT FROM 'retry'"
            " GROUP BY type ORDER BY type"
        )
        per_status = {t: (n, d) for t, n, d in await cur.fetchall()}
        assert per_status == {s.name: (runs, runs) for s in chaos_app.Status}, (
            f"events per status {why}: {per_status}"
        )
        # The retry path ran (the failure plan fails ~20% of steps at least once).
        retries = await scalar(
            admin,
            "SELECT count(*) FROM pgflow.events"
            " WHERE stream = 'chaos' AND headers->>'change' = 'retry'",
        )
        planned = sum(chaos_app.planned_failures(SEED, f, s) > 0 for f, s in expected)
        assert retries >= planned, f"{retries} retry events for {planned} failing steps {why}"

        await admin.execute("SET pgflow.stuck_after = '0 seconds'")
        stuck = await scalar(admin, "SELECT count(*) FROM pgflow.stuck_runs")
        assert stuck == 0, f"{stuck} stuck runs {why}"

        # Cursors: every step shard has one, and none was ever seen moving backwards.
        assert backwards == [], f"cursors moved backwards {why}: {backwards[:10]}"
        step_cursors = {k for k in history if k[0].startswith("chaos/")}
        assert len(step_cursors) == 3 + 2 + 3, f"{sorted(step_cursors)} {why}"
        assert sum(len(v) for v in history.values()) > 50, f"too few samples {why}"

        # The chaos really happened.
        assert actions["sigkill"] and actions["sigterm"] and actions["terminate"], actions
        assert sum(terminated_conns.values()) > 0, f"no connection was terminated {why}"

        errs = "".join(w.err.read_text() for w in fleet.workers)
        assert "UniqueViolation" not in errs, f"an effect was replayed {why}"
        exceptions = Counter(re.findall(r"^(\w+(?:\.\w+)*(?:Error|Exception|Batch)):", errs, re.M))
        print(
            f"chaos: {dict(actions)}; terminated connections: {dict(terminated_conns)};"
            f" workers started: {len(fleet.workers)}; trigger retries: {trigger_retries};"
            f" retry events: {retries}; cursor positions sampled:"
            f" {sum(len(v) for v in history.values())}; exceptions in worker logs:"
            f" {dict(exceptions)}; lost CAS: {errs.count('cursor moved concurrently')};"
            f" runs completed during chaos: {done_in_chaos}, the rest"
            f" {completed_after:.1f}s after it"
        )
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        fleet.kill_all()
        with contextlib.suppress(Exception):
            await client.close()
        await admin.close()
