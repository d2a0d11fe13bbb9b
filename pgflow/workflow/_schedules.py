"""Cron schedules: store them (``API.schedule``/``unschedule``) and fire them.

A schedule is a ``pgflow.schedules`` row per (workflow, foreign id) with its cron
spec and ``next_at``. :func:`fire_schedules`, a job of the timer poller
(:mod:`pgflow.workflow._poller`), triggers each due schedule once per tick: the row is
locked (``FOR UPDATE SKIP LOCKED``, so worker processes share the work) and its
``next_at`` moved in the trigger's transaction, and the run id is derived from the
tick, so a tick fires once however many processes poll. Ticks missed while no worker
ran are skipped, not replayed. A schedule with a filter is fired only by a process
that registered that filter (a filter is Python code, not data).

This module owns the SQL that writes ``pgflow.schedules``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from psycopg import AsyncConnection

from pgflow.errors import WorkflowInProgress
from pgflow.workflow._engine import Engine, maybe_await
from pgflow.workflow._failures import error_text

__all__ = ["ScheduleTrigger", "delete_schedule", "fire_schedules", "upsert_schedule"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)


#: Starts the run of one schedule tick in the connection's transaction:
#: ``(conn, foreign_id, initial, run_id_parts, headers)`` -> ``API.trigger`` with
#: ``run_id = run_id_for(*run_id_parts)``, raising ``WorkflowInProgress`` when the
#: foreign id has a run in progress. The Workflow (which is the client API) passes it
#: in, so this module, below the API, does not import it (``api.py`` calls
#: :func:`upsert_schedule` and :func:`delete_schedule`).
ScheduleTrigger = Callable[
    [AsyncConnection[Any], str, Any, tuple[str, ...], Mapping[str, str]], Awaitable[object]
]


async def upsert_schedule(
    conn: AsyncConnection[Any],
    workflow: str,
    foreign_id: str,
    spec: str,
    next_at: datetime,
    initial_json: str | None,
    filtered: bool,
) -> None:
    """Create or replace ``foreign_id``'s schedule (one per workflow and foreign id)."""
    await conn.execute(
        "INSERT INTO pgflow.schedules (workflow, foreign_id, spec, next_at, initial,"
        " filtered) VALUES (%s, %s, %s, %s, %s::jsonb, %s)"
        " ON CONFLICT (workflow, foreign_id) DO UPDATE SET spec = excluded.spec,"
        " next_at = excluded.next_at, initial = excluded.initial,"
        " filtered = excluded.filtered",
        (workflow, foreign_id, spec, next_at, initial_json, filtered),
    )


async def delete_schedule(conn: AsyncConnection[Any], workflow: str, foreign_id: str) -> bool:
    """Remove ``foreign_id``'s schedule; True when there was one."""
    cur = await conn.execute(
        "DELETE FROM pgflow.schedules WHERE workflow = %s AND foreign_id = %s",
        (workflow, foreign_id),
    )
    return cur.rowcount > 0


async def fire_schedules(
    engine: Engine[T, S],
    conn: AsyncConnection[Any],
    name: str,
    batch: int,
    trigger: ScheduleTrigger,
) -> int:
    """Trigger up to ``batch`` due schedules; returns how many were due."""
    from croniter import croniter

    triggered = 0
    async with conn.transaction():
        # a filtered schedule is fired only by a process that has its filter
        cur = await conn.execute(
            "SELECT foreign_id, spec, next_at, initial, filtered FROM pgflow.schedules"
            " WHERE workflow = %s AND next_at <= coalesce(%s, now())"
            " AND (NOT filtered OR foreign_id = ANY(%s))"
            " ORDER BY next_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (engine.name, engine.clock.sql_now(), list(engine.schedule_filters), batch),
        )
        rows = await cur.fetchall()
        now = engine.clock.now()
        for foreign_id, spec, tick, initial, filtered in rows:
            if not filtered or await _passes(engine, name, foreign_id, tick):
                try:
                    await trigger(
                        conn,
                        foreign_id,
                        None if initial is None else engine.objects.load(initial),
                        ("schedule", engine.name, foreign_id, str(tick)),
                        {"schedule": spec, "tick": tick.isoformat()},
                    )
                    triggered += 1
                except WorkflowInProgress:
                    logger.info(
                        "%s: schedule tick %s for %r skipped: a run is in progress",
                        name,
                        tick,
                        foreign_id,
                    )
            next_at = croniter(spec, max(now, tick)).get_next(datetime)
            await conn.execute(
                "UPDATE pgflow.schedules SET next_at = %s, last_at = %s"
                " WHERE workflow = %s AND foreign_id = %s",
                (next_at, tick, engine.name, foreign_id),
            )
    if triggered:
        engine.poke()
    return len(rows)


async def _passes(engine: Engine[Any, Any], name: str, foreign_id: str, tick: datetime) -> bool:
    """The schedule filter's verdict on ``tick``; an error skips the tick (logged),
    as retrying it at every poll would spin (luno #161)."""
    fn = engine.schedule_filters.get(foreign_id)
    if fn is None:  # unscheduled here meanwhile
        return False
    try:
        ok = bool(await maybe_await(fn(tick)))
    except Exception as exc:
        logger.warning(
            "%s: schedule filter for %r failed at tick %s (tick skipped): %s",
            name,
            foreign_id,
            tick,
            error_text(exc),
        )
        return False
    if not ok:
        logger.info("%s: schedule tick %s for %r filtered out", name, tick, foreign_id)
    return ok
