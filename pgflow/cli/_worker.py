"""``pgflow worker module:attr``: run a workflow's consumers until Ctrl-C / SIGTERM.

``attr`` names a :class:`pgflow.Builder` (built here with ``--dsn``), a
:class:`pgflow.Workflow`, or a zero-argument factory returning either. On SIGINT or
SIGTERM the worker stops taking new batches, lets the batches in flight commit or roll
back, and exits 0. Start as many workers as you like, on as many machines: shards are
shared between them and a dead worker's shards move to the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from psycopg import AsyncConnection

from pgflow import _db
from pgflow.cli._common import add_command, build_workflow, connected, fetch
from pgflow.cli._render import add_format_arguments, render, selected_format
from pgflow.errors import ConfigError, WorkerFailed
from pgflow.ops.migrations import check_schema
from pgflow.workflow._heartbeat import Heartbeat
from pgflow.workflow.workflow import Workflow

__all__ = ["register", "serve"]

logger = logging.getLogger(__name__)


def _pool_size_default() -> int | None:
    raw = os.environ.get("PGFLOW_POOL_SIZE")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"PGFLOW_POOL_SIZE must be a whole number, not {raw!r}") from None


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "worker",
        "run a workflow's steps, timeouts and connectors",
        "Run the consumers of MODULE:ATTR (a pgflow.Builder, a pgflow.Workflow, or a "
        "zero-argument factory of one) until Ctrl-C or SIGTERM; the batches in flight "
        "finish before it exits.",
    )
    parser.add_argument(
        "targets",
        metavar="MODULE:ATTR",
        nargs="+",
        help="one or more workflows; one process runs them all on one LISTEN connection",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="connections in the worker's pool (default: $PGFLOW_POOL_SIZE, else the "
        "workflow's own, 10); the worker also holds one LISTEN connection",
    )
    parser.add_argument(
        "--listen-dsn",
        default=None,
        help="a direct (or session-pooled) connection string for the LISTEN connection "
        "when --dsn goes through a transaction pooler (default: $PGFLOW_LISTEN_DSN; "
        "without one the worker polls)",
    )
    parser.set_defaults(func=run)

    workers = add_command(
        subparsers,
        "workers",
        "list worker processes and whether they are alive",
        "List pgflow.workers: one row per running `pgflow worker` with its last "
        "heartbeat. ALIVE is 'no' when the heartbeat is older than three periods (the "
        "process died or its event loop is stuck); FAILURE says why a worker gave up.",
    )
    add_format_arguments(workers)
    workers.set_defaults(func=list_workers)


_WORKERS_SQL = """
SELECT host, pid, array_to_string(workflows, ', ') AS workflows, tasks,
       heartbeat_at > now() - make_interval(secs => 3 * interval_s) AND failure IS NULL
           AS alive,
       now() - heartbeat_at AS last_beat, started_at, failure, worker_id
FROM pgflow.workers ORDER BY host, pid
"""


async def _list_workers(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    cols, rows = await fetch(conn, _WORKERS_SQL)
    alive = cols.index("alive")
    rows = [(*r[:alive], "yes" if r[alive] else "no", *r[alive + 1 :]) for r in rows]
    print(render(cols, rows, selected_format(args)))
    return 0


list_workers = connected(_list_workers)


def run(args: argparse.Namespace) -> int:
    pool_size = args.pool_size if args.pool_size is not None else _pool_size_default()
    workflows = [
        build_workflow(target, args.dsn, pool_size, args.listen_dsn) for target in args.targets
    ]
    asyncio.run(serve(*workflows))
    return 0


async def serve(
    *workflows: Workflow[Any, Any],
    stop: asyncio.Event | None = None,
    heartbeat_interval: float | None = None,
) -> None:
    """Run ``workflows`` until ``stop`` is set or SIGINT/SIGTERM arrives, then stop them
    cleanly (batches in flight commit or roll back).

    The schema is checked first (a one-line :class:`SchemaError` instead of a worker
    that says "running" and then fails every second). While running, a heartbeat row
    in ``pgflow.workers`` shows the process is alive (``pgflow workers``). When a
    supervised task gives up (:mod:`pgflow.workflow._supervise`) the worker stops and raises
    :class:`WorkerFailed`: a process that cannot run all its consumers must not look
    healthy — its own supervisor restarts it.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    names = ", ".join(wf.name for wf in workflows)
    interval = heartbeat_interval or _heartbeat_default()
    conn = await _db.connect(workflows[0].engine.dsn, autocommit=True)
    try:
        await check_schema(conn)
    finally:
        await conn.close()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    heartbeat: Heartbeat | None = None
    failed: list[str] = []
    try:
        for wf in workflows:
            await wf.run()
        heartbeat = Heartbeat(
            await workflows[0].engine.pool(),
            [wf.name for wf in workflows],
            lambda: (
                sum(len(wf._tasks) for wf in workflows),
                next((wf.failure for wf in workflows if wf.failure), None),
            ),
            interval,
        )
        await heartbeat.start()
        print(f"pgflow worker: {names} running (Ctrl-C to stop)", flush=True)
        waits = [asyncio.ensure_future(stop.wait())]
        waits += [asyncio.ensure_future(wf.failed.wait()) for wf in workflows]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        failed = [wf.failure for wf in workflows if wf.failure]
        print(f"pgflow worker: {names} stopping", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if heartbeat is not None and not failed:
            await heartbeat.stop()
        elif heartbeat is not None:
            with contextlib.suppress(Exception):
                await heartbeat.beat()  # leave the failure visible in pgflow workers
        for wf in workflows:
            await wf.stop()
    if failed:
        raise WorkerFailed(f"worker cannot keep its consumers running: {failed[0]}")


def _heartbeat_default() -> float:
    raw = os.environ.get("PGFLOW_HEARTBEAT_INTERVAL", "5")
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ConfigError(f"PGFLOW_HEARTBEAT_INTERVAL must be a positive number, not {raw!r}")
    return value
