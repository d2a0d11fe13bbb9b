"""Chaos with the database itself restarting, and the connector path in the mix.

A private PostgreSQL cluster (never the shared server) serves three ``pgflow worker
tests.chaos_connector_app:wf`` subprocesses. A table connector is fed by 8 concurrent
writers that commit or roll back at random; a webhook gets posts (retried until a 200,
to any live worker). Meanwhile a seeded chaos loop SIGKILLs and SIGTERMs workers,
``pg_terminate_backend``s random connections, and restarts PostgreSQL itself
(``pg_ctl restart -m immediate``: a crash, with crash recovery).

Oracle: every committed source row and every acknowledged post -> exactly one run,
COMPLETED, and exactly one effect (0 lost, 0 duplicated; no run from nowhere); consumer
lag back to 0 within 10 s after the chaos stops; no cursor ever seen moving backwards.

``PGFLOW_CHAOS_EVENTS`` sets the number of source events (default 1500, paced over
``PGFLOW_CHAOS_SECONDS``, default 20; the whole test takes ~40 s);
``PGFLOW_CHAOS_SEED`` replays a chaos plan; ``PGFLOW_CHAOS_INTERVAL=lo,hi`` spaces the
chaos actions (default 0.3,1.0 s). The long mode, e.g. ``PGFLOW_CHAOS_EVENTS=100000
PGFLOW_CHAOS_SECONDS=600 PGFLOW_CHAOS_INTERVAL=2,6``, spreads the load and the chaos
over ten minutes (workers killed every 0.3-1 s spend most of their life starting up).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg.conninfo import make_conninfo

import pgflow
from pgflow.connectors import table
from pgflow.log.snapshots import CONSUMED
from pgflow.postgres import LocalCluster, find_pg_bin, throwaway_cluster
from tests import chaos_connector_app as app

# restarts a throwaway cluster under load: ~20 s
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("PGFLOW_CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))
EVENTS = int(os.environ.get("PGFLOW_CHAOS_EVENTS", "1500"))
SECONDS = float(os.environ.get("PGFLOW_CHAOS_SECONDS", "20"))  #: the load is paced over it
#: seconds between two chaos actions (uniform in this range)
INTERVAL = tuple(float(x) for x in os.environ.get("PGFLOW_CHAOS_INTERVAL", "0.3,1.0").split(","))
HOOK_SHARE = 0.15  #: of EVENTS, sent as webhook posts; the rest are table rows
WRITERS = 8
WORKERS = 3
OBSERVER = "pgflow-chaos-observer"  #: never terminated by the chaos loop

Conn = AsyncConnection[Any]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """A private cluster, restarted with synchronous commits: a crash restart must not
    lose a commit the test was told about (``throwaway_cluster`` turns them off)."""
    with throwaway_cluster() as c:
        _pg_ctl(c, "restart", "-m", "fast")
        yield c


def _pg_ctl(c: LocalCluster, *args: str) -> None:
    options = (
        f"-p {c.port} -k {c.socket_dir} -c listen_addresses=127.0.0.1"
        " -c max_connections=200 -c fsync=off -c full_page_writes=off"
    )
    result = c._run(
        find_pg_bin("pg_ctl"), *args, "-w", "-t", "60", "-D", str(c.data_dir),
        "-l", str(c.log_file), "-o", options,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout


@dataclass
class Worker:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    terminated: bool = False

    def ready(self) -> bool:
        return b"running" in self.out.read_bytes()


class Fleet:
    def __init__(self, dsn: str, logs: Path) -> None:
        self.dsn = dsn
        self.logs = logs
        self.workers: list[Worker] = []

    def start(self) -> Worker:
        name = f"w{len(self.workers) + 1}"
        port = _free_port()
        env = {
            **os.environ,
            "PGFLOW_DATABASE_URL": make_conninfo(self.dsn, application_name=f"chaos-{name}"),
            "CHAOS_WEBHOOK_PORT": str(port),
            "PYTHONPATH": str(ROOT),
            "PGFLOW_LOG_LEVEL": "INFO",
        }
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "pgflow"), "worker",
                 "tests.chaos_connector_app:wf"],
                cwd=ROOT, env=env, stdout=o, stderr=e,
            )  # fmt: skip
        worker = Worker(name, port, proc, out, err)
        self.workers.append(worker)
        return worker

    def serving(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None and not w.terminated]

    def restart_exited(self) -> int:
        """Like systemd's Restart=always: a worker that exited by itself (one started
        while PostgreSQL was down exits 1 at once) is replaced."""
        exited = [w for w in self.workers if w.proc.poll() is not None and not w.terminated]
        for w in exited:
            w.terminated = True
            self.start()
        return len(exited)

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


async def scalar(conn: Conn, sql: str) -> Any:
    cur = await conn.execute(sql)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


def _post(port: int, event: dict[str, Any]) -> bool:
    """POST one event; True on a 200 (the event is committed)."""
    body = json.dumps(event).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/", body, method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@pytest.mark.timeout(max(300, int(SECONDS * 2 + EVENTS / 100 + 120)))
async def test_chaos_with_postgres_restarts_and_connectors(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    dsn = cluster.dsn
    why = f"(PGFLOW_CHAOS_SEED={SEED}, worker logs in {tmp_path})"
    print(f"\nPGFLOW_CHAOS_SEED={SEED} events={EVENTS} logs={tmp_path}")
    rng = random.Random(SEED)
    await pgflow.migrate(dsn)
    admin = await observer(dsn)
    await admin.execute(app.APP_TABLES)
    await table.add_tx_column(admin, "cx_orders")
    await admin.close()
    fleet = Fleet(dsn, tmp_path)

    # -- cursor sampler (reconnects across restarts) -----------------------------------
    # A position is a snapshot: compare what each cursor has consumed (events of its
    # stream, or rows of the source table) — a cursor moving back would consume less.
    history: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    backwards: list[str] = []

    async def sample(conn: Conn) -> None:
        cur = await conn.execute(
            "SELECT c.consumer, c.shard, c.shard_count, CASE WHEN c.stream IS NOT NULL"
            f" THEN (SELECT count(*) FROM pgflow.events e WHERE e.stream = c.stream AND {CONSUMED})"
            f" ELSE (SELECT count(*) FROM cx_orders e WHERE {CONSUMED}) END"
            " FROM pgflow.cursors c"
        )
        for consumer, shard, count, consumed in await cur.fetchall():
            key, pos = (consumer, shard, count), int(consumed)
            seen = history[key]
            if seen and pos < seen[-1]:
                backwards.append(f"{key}: {seen[-1]} -> {pos}")
            if not seen or pos != seen[-1]:
                seen.append(pos)

    async def sampler() -> None:
        while True:
            with contextlib.suppress(psycopg.OperationalError, OSError):
                async with await observer(dsn) as conn:
                    while True:
                        await sample(conn)
                        await asyncio.sleep(0.03)
            await asyncio.sleep(0.1)

    # -- the load: 8 writers (random commit/rollback) and webhook posters --------------
    table_target = EVENTS - int(EVENTS * HOOK_SHARE)
    hook_target = int(EVENTS * HOOK_SHARE)
    written = Counter[str]()
    acked: set[str] = set()
    posted: set[str] = set()
    load_done = asyncio.Event()
    load_start = time.monotonic()

    async def pace(done: int, target: int) -> None:
        """Spread the load over SECONDS, so the chaos has time to hit it."""
        ahead = load_start + done * SECONDS / max(target, 1) - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)

    async def writer(n: int) -> None:
        wrng = random.Random(SEED * 31 + n)
        i = 0
        while written["attempted"] < table_target * 1.25 and written["committed"] < table_target:
            try:
                async with await AsyncConnection.connect(
                    make_conninfo(dsn, application_name=f"writer-{n}")
                ) as conn:
                    while written["committed"] < table_target:
                        await pace(written["committed"], table_target)
                        rows = wrng.randint(1, 3)
                        async with conn.transaction(force_rollback=wrng.random() < 0.2) as tx:
                            for _ in range(rows):
                                i += 1
                                await conn.execute(
                                    "INSERT INTO cx_orders (foreign_id) VALUES (%s)",
                                    (f"t{n}-{i}",),
                                )
                        written["attempted"] += rows
                        if not tx.force_rollback:
                            written["committed"] += rows
                        written["transactions"] += 1
            except (psycopg.OperationalError, OSError):
                written["reconnects"] += 1
                await asyncio.sleep(0.05)

    async def poster(n: int) -> None:
        for i in range(n, hook_target, 2):
            event_id = f"h{i}"
            await pace(len(posted), hook_target)
            posted.add(event_id)
            event = {"id": event_id, "foreign_id": event_id, "type": "order"}
            for _ in range(2000):
                live = [w for w in fleet.serving() if w.ready()]
                if live and await asyncio.to_thread(_post, rng.choice(live).port, event):
                    acked.add(event_id)
                    break
                written["post_retries"] += 1
                await asyncio.sleep(0.05)

    async def load() -> None:
        await asyncio.gather(*(writer(n) for n in range(WRITERS)), poster(0), poster(1))
        load_done.set()

    # -- chaos ---------------------------------------------------------------------------
    actions: Counter[str] = Counter()

    def victim() -> Worker | None:
        serving = fleet.serving()
        return rng.choice([w for w in serving if w.ready()] or serving) if serving else None

    async def chaos() -> None:
        kinds = ["sigkill", "sigterm", "terminate", "restart"]
        first = rng.sample(kinds, len(kinds))
        last_restart = 0.0
        while not load_done.is_set():
            await asyncio.sleep(rng.uniform(*INTERVAL))
            actions["exited"] += fleet.restart_exited()
            kind = first.pop(0) if first else rng.choices(kinds, weights=[3, 2, 5, 1])[0]
            if kind == "restart" and time.monotonic() - last_restart < 5:
                kind = "terminate"  # let it recover in between
            actions[kind] += 1
            if kind in ("sigkill", "sigterm"):
                w = victim()
                if w is None:
                    continue
                w.terminated = True
                if kind == "sigkill":
                    w.proc.kill()
                    await asyncio.to_thread(w.proc.wait)
                else:
                    w.proc.terminate()  # it finishes its batches while the next one starts
                fleet.start()
            elif kind == "restart":
                await asyncio.to_thread(_pg_ctl, cluster, "restart", "-m", "immediate")
                last_restart = time.monotonic()
            else:
                with contextlib.suppress(psycopg.OperationalError, OSError):
                    async with await observer(dsn) as conn:
                        cur = await conn.execute(
                            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                            " AND application_name <> %s ORDER BY pid",
                            (OBSERVER,),
                        )
                        pids = [r[0] for r in await cur.fetchall()]
                        if pids:
                            await conn.execute(
                                "SELECT pg_terminate_backend(%s)", (rng.choice(pids),)
                            )

    tasks: list[asyncio.Task[None]] = []
    try:
        for _ in range(WORKERS):
            fleet.start()
        tasks = [asyncio.create_task(sampler()), asyncio.create_task(load())]
        chaos_task = asyncio.create_task(chaos())
        tasks.append(chaos_task)
        started = time.monotonic()
        await chaos_task
        await tasks[1]
        chaos_end = time.monotonic()
        fleet.restart_exited()
        admin = await observer(dsn)

        async def settled() -> bool:
            rows = await scalar(admin, "SELECT count(*) FROM cx_orders")
            done = await scalar(
                admin, "SELECT count(*) FROM pgflow.records WHERE run_state = 'COMPLETED'"
            )
            lag = await scalar(
                admin, "SELECT coalesce(sum(lag_events), 0) FROM pgflow.consumer_lag"
            )
            return bool(done >= rows + len(acked) and lag == 0)

        # Wait longer than the 10 s the oracle allows (asserted last), so that a slow
        # catch-up still reports its figures.
        deadline = chaos_end + max(10.0, EVENTS / 200)
        while not await settled():
            if time.monotonic() > deadline:
                cur = await admin.execute(
                    "SELECT consumer, shard, lag_events FROM pgflow.consumer_lag"
                    " WHERE lag_events > 0"
                )
                raise AssertionError(
                    f"not caught up {deadline - chaos_end:.0f} s after the chaos {why}:"
                    f" {await cur.fetchall()}"
                )
            await asyncio.sleep(0.1)
        caught_up_after = time.monotonic() - chaos_end

        # -- oracle ------------------------------------------------------------------------
        cur = await admin.execute("SELECT foreign_id FROM cx_orders")
        rows = {r[0] for r in await cur.fetchall()}
        cur = await admin.execute(
            "SELECT foreign_id, count(*), bool_and(run_state = 'COMPLETED')"
            " FROM pgflow.records WHERE workflow = 'cx' GROUP BY 1"
        )
        runs = {fid: (n, ok) for fid, n, ok in await cur.fetchall()}
        cur = await admin.execute("SELECT foreign_id, count(*) FROM cx_effect_log GROUP BY 1")
        effects = dict(await cur.fetchall())
        expected = rows | acked
        lost = sorted(expected - runs.keys())
        doubled = sorted(f for f, (n, _) in runs.items() if n > 1)
        strangers = sorted(runs.keys() - rows - posted)
        unfinished = sorted(f for f, (_, ok) in runs.items() if not ok)
        assert lost == [], f"{len(lost)} events without a run {why}: {lost[:10]}"
        assert doubled == [], f"{len(doubled)} events with several runs {why}: {doubled[:10]}"
        assert strangers == [], f"runs from nowhere {why}: {strangers[:10]}"
        assert unfinished == [], f"runs not completed {why}: {unfinished[:10]}"
        assert set(effects) == set(runs), f"effects missing {why}"
        assert [f for f, n in effects.items() if n != 1] == [], f"effects doubled {why}"
        assert backwards == [], f"cursors moved backwards {why}: {backwards[:10]}"
        assert actions["restart"] >= 1 and actions["sigkill"] and actions["terminate"], actions
        assert rows, "the writers committed nothing"

        errs = "".join(w.err.read_text() for w in fleet.workers)
        assert "UniqueViolation" not in errs, f"an effect was replayed {why}"
        print(
            f"chaos restart: {dict(actions)}; workers started: {len(fleet.workers)};"
            f" table rows committed: {len(rows)} (writer transactions:"
            f" {written['transactions']}, reconnects: {written['reconnects']}); webhook posts"
            f" acked: {len(acked)} of {len(posted)} (retries: {written['post_retries']});"
            f" runs: {len(runs)}; load+chaos {chaos_end - started:.1f}s; caught up"
            f" {caught_up_after:.1f}s after the chaos; cursor positions sampled:"
            f" {sum(len(v) for v in history.values())}"
        )
        assert caught_up_after <= 10, f"caught up only {caught_up_after:.1f}s after the chaos {why}"
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        fleet.kill_all()
        with contextlib.suppress(Exception):
            await admin.close()
