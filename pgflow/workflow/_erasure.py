"""Finishing data erasures: the timer poller's job for ``delete_data``.

``delete_data`` is two transactions (:func:`pgflow.workflow.actions.request_data_deletion`
marks the run REQUESTED_DATA_DELETED, :func:`~pgflow.workflow.actions.erase_data` scrubs
its object and the connectors' copies and marks it DATA_DELETED). A process that died
between the two — or a ``custom_delete`` that raised — leaves a run
REQUESTED_DATA_DELETED, the erasure promised but not done;
:func:`erase` finishes those at every poll (after a second, so the API call that asked
finishes its own first).
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import AsyncConnection

from pgflow.workflow import actions
from pgflow.workflow._engine import Engine
from pgflow.workflow._failures import error_text

__all__ = ["erase"]

logger = logging.getLogger(__name__)


async def erase(engine: Engine[Any, Any], conn: AsyncConnection[Any], name: str, batch: int) -> int:
    """Finish up to ``batch`` requested erasures; returns how many were tried."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT foreign_id, run_id FROM pgflow.records WHERE workflow = %s"
            " AND run_state = 'REQUESTED_DATA_DELETED'"
            " AND updated_at < now() - interval '1s' LIMIT %s",
            (engine.name, batch),
        )
        rows = await cur.fetchall()
        for foreign_id, run_id in rows:
            try:
                await actions.erase_data(
                    conn,
                    engine.name,
                    foreign_id,
                    run_id,
                    scrub=engine.scrub,
                    erase_copies=engine.erase_copies,
                )
            except psycopg.OperationalError:
                raise
            except Exception as exc:  # a failing custom_delete: retried next tick
                logger.warning(
                    "%s: data deletion of %r (run %s) failed: %s",
                    name,
                    foreign_id,
                    run_id,
                    error_text(exc),
                )
    if rows:
        engine.poke()
    return len(rows)
