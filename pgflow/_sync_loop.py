"""The hand-written part of :mod:`pgflow.sync`: a private event loop to call into.

:class:`LoopClient` owns one event loop in a daemon thread; ``pgflow.sync.SyncWorkflow``
(generated from the async API by ``tools/gen_sync.py``) extends it with one blocking
method per client call, each a one-line hand-over to that loop. Every call — plain
methods too, since the workflow's pool, notifier and listener belong to its loop — runs
in the loop's thread and is waited for, so the facade works from any thread (web server
workers included) and never touches the caller's own event loop.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, ParamSpec, Self, TypeVar

from pgflow.workflow.workflow import Workflow

__all__ = ["LoopClient"]

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)
R = TypeVar("R")
P = ParamSpec("P")


class LoopClient(Generic[T, S]):
    """One :class:`pgflow.Workflow` driven from a private loop (see the module doc)."""

    def __init__(self, wf: Workflow[T, S]) -> None:
        self.workflow = wf
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"pgflow-sync:{wf.name}", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, R], timeout: float | None = None) -> R:
        """Run ``coro`` on the private loop and wait for its result."""
        if self._closed:
            coro.close()
            raise RuntimeError("this pgflow.sync workflow is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _in_loop(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the plain function ``fn`` in the private loop's thread (``poke`` wakes
        consumers through loop-bound objects, which are not thread-safe)."""

        async def call() -> R:
            return fn(*args, **kwargs)

        return self._call(call())

    def close(self) -> None:
        """Close the pool and stop the private loop (idempotent)."""
        if self._closed:
            return
        try:
            self._call(self.workflow.close(), timeout=60)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
