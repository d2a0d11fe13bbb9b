"""Group commit for the webhook: many concurrent posts, one transaction, each isolated.

Each accepted post waits for the commit of the batch it joined, so ``200`` means
durable while the cost of a commit is shared. Two rules keep one post from hurting the
others:

* **Isolation.** A batch the database refuses because of a value in it (one it cannot
  store, a constraint) is split in halves and each half retried, down to the single
  post at fault, which alone gets :class:`Rejected`; the rest are stored. (Such values
  are refused earlier, by the codec; this is the second fence.) Any other failure (the
  database unreachable, the schema not migrated) is nobody's fault in the batch: all
  get :class:`Unavailable` (``503``: the sender retries).
* **Liveness.** The batching task survives any exception, and is restarted on the next
  post if it ever ended.

Replays: a post with a key (the sender's event id) claims it in
``pgflow.webhook_seen`` in the same transaction as its ``pgflow.events`` row. A key
already claimed — by an earlier batch, another process, or an earlier post of the same
batch — gets the first post's position back with ``duplicate=True`` and stores nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgflow.connectors.table import CursorStore
from pgflow.log.events import NewEvent, append

__all__ = ["GroupCommit", "Rejected", "Stored", "Unavailable"]

logger = logging.getLogger(__name__)

#: errors caused by a value in the batch (DataError: NUL, bad escape; ValueError: text
#: psycopg cannot encode): isolate the post at fault
_DATA = (psycopg.DataError, psycopg.IntegrityError, ValueError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class Stored:
    position: int  #: ``pgflow.events.id`` of the stored event (the first, for a duplicate)
    duplicate: bool  #: the key was seen before: nothing was stored this time


class Unavailable(Exception):
    """The database could not be reached: the post was not stored (retry)."""


class Rejected(Exception):
    """The database refused this one event (a value it cannot store)."""


@dataclass(slots=True)
class _Post:
    event: NewEvent
    key: str | None
    future: asyncio.Future[Stored] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def settle(self, result: Stored | BaseException) -> None:
        if self.future.done():
            return  # the client went away; what was stored stays stored
        if isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


class GroupCommit:
    """Appends posted events to ``stream`` in batches; see the module doc."""

    def __init__(self, store: CursorStore, stream: str, max_batch: int = 500) -> None:
        self.store = store
        self.stream = stream
        self.max_batch = max_batch
        self.on_commit: list[Any] = []  #: called after each committed batch
        #: posts submitted and not answered yet (queued, or in the batch being
        #: committed): the ingest queue's depth, for metrics and tests
        self.waiting = 0
        self._pending: list[_Post] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, event: NewEvent, key: str | None = None) -> Stored:
        """Store ``event`` (once per ``key``); raises :class:`Unavailable` or
        :class:`Rejected` when it was not stored."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"pgflow-ingest-{self.stream}")
        post = _Post(event, key)
        self._pending.append(post)
        self._wake.set()
        self.waiting += 1
        try:
            return await post.future
        finally:
            self.waiting -= 1

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pending, self._pending = self._pending, []
        for post in pending:
            post.settle(Unavailable("webhook connector stopped"))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                try:
                    await self._commit_isolated(batch)
                except Exception as exc:  # never let the task die: answer and go on
                    logger.exception("webhook %s: batch failed unexpectedly", self.stream)
                    for post in batch:
                        post.settle(Unavailable(f"internal error: {type(exc).__name__}"))
                for callback in self.on_commit:
                    callback()

    async def _commit_isolated(self, batch: list[_Post]) -> None:
        try:
            results = await self._commit(batch)
        except _DATA as exc:
            if len(batch) > 1:  # find the post at fault; store the others
                half = len(batch) // 2
                await self._commit_isolated(batch[:half])
                await self._commit_isolated(batch[half:])
                return
            reason = _first_line(exc)
            logger.info("webhook %s: event refused by the database: %s", self.stream, reason)
            batch[0].settle(Rejected(reason))
            return
        except Exception as exc:  # unreachable, not migrated, ...: nobody's fault in the batch
            logger.warning("webhook %s: could not store events (%s)", self.stream, exc)
            for post in batch:
                post.settle(Unavailable(_first_line(exc)))
            return
        for post, result in zip(batch, results, strict=True):
            post.settle(result)

    async def _commit(self, batch: Sequence[_Post]) -> list[Stored]:
        """One transaction: claim the keys, append the new events, record positions."""
        first: dict[str, int] = {}  # key -> index of its first post in the batch
        for i, post in enumerate(batch):
            if post.key is not None:
                first.setdefault(post.key, i)
        pool = await self.store.pool()
        async with pool.connection() as conn, conn.transaction():
            claimed: set[str] = set()
            seen: dict[str, int] = {}
            if first:
                cur = await conn.execute(
                    "INSERT INTO pgflow.webhook_seen (stream, event_id, position)"
                    " SELECT %s, k, 0 FROM unnest(%s::text[]) k"
                    " ON CONFLICT DO NOTHING RETURNING event_id",
                    (self.stream, list(first)),
                )
                claimed = {row[0] for row in await cur.fetchall()}
                if len(claimed) < len(first):
                    cur = await conn.execute(
                        "SELECT event_id, position FROM pgflow.webhook_seen"
                        " WHERE stream = %s AND event_id = ANY(%s)",
                        (self.stream, [k for k in first if k not in claimed]),
                    )
                    seen = {row[0]: int(row[1]) for row in await cur.fetchall()}
            new = [
                i
                for i, post in enumerate(batch)
                if post.key is None or (post.key in claimed and first[post.key] == i)
            ]
            ids = await append(conn, [batch[i].event for i in new]) if new else []
            positions = dict(zip(new, ids, strict=True))
            if claimed:
                keys = [k for k in first if k in claimed]
                await conn.execute(
                    "UPDATE pgflow.webhook_seen s SET position = v.position"
                    " FROM unnest(%s::text[], %s::bigint[]) v(event_id, position)"
                    " WHERE s.stream = %s AND s.event_id = v.event_id",
                    (keys, [positions[first[k]] for k in keys], self.stream),
                )
        results: list[Stored] = []
        for i, post in enumerate(batch):
            if i in positions:
                results.append(Stored(positions[i], duplicate=False))
            else:
                assert post.key is not None
                position = positions.get(first[post.key]) or seen[post.key]
                results.append(Stored(position, duplicate=True))
        return results
