"""Supervision of a worker's long-running tasks: a task that dies is restarted.

Every consumer loop already contains its own errors (a failing batch is retried with
backoff, a failing run is that run's error). What is left are bugs and exceptions no
loop expects (a ``BaseException`` from a library, an error while handling an error):
without supervision such a task would end silently and its shard would stop while the
process looks healthy.

:func:`supervise` runs a loop factory; when the loop raises (or returns although
nobody asked it to stop) the traceback is logged and the loop is started again after
a backoff. A loop that keeps dying — ``max_restarts`` failures within ``window``
seconds — is given up: ``on_give_up`` is called (the worker then exits non-zero, so
its supervisor, systemd or Kubernetes, restarts the whole process) and the task
ends. Cancelling the supervising task (shutdown) is never contained.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

__all__ = ["supervise"]

logger = logging.getLogger(__name__)


async def supervise(
    name: str,
    loop: Callable[[], Awaitable[None]],
    *,
    stopping: Callable[[], bool],
    on_give_up: Callable[[str], None] | None = None,
    max_restarts: int = 5,
    window: float = 60.0,
    backoff: float = 0.1,
    max_backoff: float = 5.0,
) -> None:
    """Run ``loop()`` until ``stopping()``; restart it when it dies (see the module doc)."""
    failures: list[float] = []
    delay = backoff
    while True:
        try:
            await loop()
            if stopping():
                return
            error: BaseException = RuntimeError(f"{name} returned while not stopping")
            logger.error("%s: task ended unexpectedly; restarting", name)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if stopping() or task is None or task.cancelling():
                raise  # our own shutdown
            error = exc
            logger.error("%s: task died (stray CancelledError); restarting", name, exc_info=exc)
        except Exception as exc:
            if stopping():
                logger.warning("%s: task failed while stopping: %s", name, exc, exc_info=exc)
                return
            error = exc
            logger.error("%s: task died; restarting", name, exc_info=exc)
        now = time.monotonic()
        failures = [t for t in failures if now - t < window] + [now]
        if len(failures) >= max_restarts:
            message = (
                f"{name}: died {len(failures)} times in {window:.0f}s "
                f"(last: {type(error).__name__}: {error}); giving up"
            )
            logger.critical(message)
            if on_give_up is not None:
                on_give_up(message)
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_backoff)
