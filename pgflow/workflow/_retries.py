"""Retries the timer poller drives: failed steps, and runs paused after too many errors.

* :func:`emit_retries` re-emits the current event of runs whose step failed once
  ``retry_at`` has passed (see :mod:`pgflow.workflow._steps` for why a retry is an
  event; :func:`pgflow.workflow.records.claim_due_retries` is the statement).
* :func:`resume_paused` resumes runs paused after too many errors once their
  ``pause_retry`` delay (``retry_at`` of a PAUSED run) has passed: luno's paused-records
  retry, except that a run paused by hand stays paused (its pause cleared
  ``retry_at``).

Both are jobs of :class:`pgflow.workflow._poller.Poller`: ``(engine, conn, name,
batch) -> rows handled``, a full batch telling the poller to come back at once.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg import AsyncConnection

from pgflow.workflow import actions
from pgflow.workflow._engine import Engine
from pgflow.workflow.records import claim_due_retries

__all__ = ["PAUSE_RETRY_REASON", "emit_retries", "resume_paused"]

#: The run-state reason of a run resumed by ``pause_retry``.
PAUSE_RETRY_REASON = "pause_retry: resumed automatically"

logger = logging.getLogger(__name__)


async def emit_retries(
    engine: Engine[Any, Any], conn: AsyncConnection[Any], name: str, batch: int
) -> int:
    """Re-emit the events of up to ``batch`` runs whose step retry is due."""
    async with conn.transaction():
        count = await claim_due_retries(conn, engine.name, engine.clock.sql_now(), batch)
    if count:
        engine.poke()
    return count


async def resume_paused(
    engine: Engine[Any, Any], conn: AsyncConnection[Any], name: str, batch: int
) -> int:
    """Resume runs paused after too many errors whose ``pause_retry`` has passed."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT foreign_id, run_id FROM pgflow.records"
            " WHERE workflow = %s AND run_state = 'PAUSED'"
            " AND retry_at <= coalesce(%s, now())"
            " ORDER BY retry_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (engine.name, engine.clock.sql_now(), batch),
        )
        rows = await cur.fetchall()
        for foreign_id, run_id in rows:
            rec = await actions.resume(
                conn, engine.name, foreign_id, run_id, reason=PAUSE_RETRY_REASON
            )
            logger.info("%s: run %s of %r resumed by pause_retry", name, rec.run_id, foreign_id)
    if rows:
        engine.poke()
    return len(rows)
