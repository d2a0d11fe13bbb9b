"""Worker liveness: a heartbeat row per worker process in ``pgflow.workers``.

A process can look healthy (it answers signals, its pool is open) while doing no
work. The heartbeat is written by the same event loop that runs the consumers, so a
blocked or crashed loop stops it; the row also carries the worker's task count and,
once a supervised task gave up (:mod:`pgflow.workflow._supervise`), the reason. ``pgflow
workers`` lists the rows; a row older than three periods is a dead worker (a clean stop
deletes its own row; a killed one leaves it, and the next start prunes rows older than
an hour).

This module owns the SQL that writes ``pgflow.workers`` (``pgflow workers`` only reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

__all__ = ["Heartbeat"]

logger = logging.getLogger(__name__)


class Heartbeat:
    """Upserts this process's ``pgflow.workers`` row every ``interval`` seconds."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        workflows: Sequence[str],
        status: Callable[[], tuple[int, str | None]],
        interval: float = 5.0,
    ) -> None:
        self.pool = pool
        self.workflows = list(workflows)
        self.status = status  #: () -> (supervised tasks, failure or None)
        self.interval = interval
        self.worker_id = uuid.uuid4()
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        tasks, failure = self.status()
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO pgflow.workers AS w (worker_id, host, pid, workflows, tasks,"
                " failure, interval_s) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = now(),"
                " tasks = excluded.tasks, failure = excluded.failure",
                (
                    self.worker_id,
                    socket.gethostname(),
                    os.getpid(),
                    self.workflows,
                    tasks,
                    failure,
                    self.interval,
                ),
            )

    async def start(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "DELETE FROM pgflow.workers WHERE heartbeat_at < now() - interval '1 hour'"
            )
        await self.beat()  # errors here (no schema...) are the caller's to report
        self._task = asyncio.create_task(self._loop(), name="pgflow:heartbeat")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except (psycopg.Error, OSError) as exc:
                logger.warning("heartbeat failed (%s); retrying", exc)
            except Exception:
                logger.exception("heartbeat failed; retrying")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        with contextlib.suppress(psycopg.Error, OSError):
            async with self.pool.connection() as conn:
                await conn.execute(
                    "DELETE FROM pgflow.workers WHERE worker_id = %s", (self.worker_id,)
                )
