"""Every database read and write the console makes, by page, under one name (``q``).

The console must stay fast on big tables (a million runs, ten million events), so each
query is shaped for an index (``migrations/0010_ui_indexes.sql``):

* lists are **keyset-paginated** — the page token is the last row's sort key, never an
  ``OFFSET`` — so page 1000 costs what page 1 costs (:mod:`._paging`);
* counts are **capped**: ``count(*)`` over ``LIMIT cap + 1`` rows of an index, shown as
  "10,000+" when the cap is hit. A whole-table ``count(*)`` never runs on a page load;
* distinct workflows / statuses come from a loose index scan (a recursive CTE hopping
  through the ``(workflow, status, ...)`` index), not ``SELECT DISTINCT`` over the table
  (:mod:`._run_queries`);
* consumer lag counts at most ``cap + 1`` events ahead of each cursor (:mod:`._lag_queries`).

Reads go through pgflow's human views (``pgflow.runs``, ``pgflow.run_history``,
``pgflow.stuck_runs``, ``pgflow.horizon``, ``pgflow.dead_letter_queue``) where they
push down to the indexes, so psql users see the same thing. Writes (pause, resume,
cancel, retry, replay) go through :mod:`pgflow.workflow.actions` and
:mod:`pgflow.ops.dead_letters`: the console can do nothing the engine and ``pgflow``
CLI would not. The Query page runs :func:`pgflow.ops.inspect.inspect` (its validation
and read-only fences), never SQL of its own.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from pgflow.ops import dead_letters as _dead_letters
from pgflow.ops.inspect import InspectResult, inspect
from pgflow.ui._lag_queries import LAG_CAP, consumer_lag, horizon
from pgflow.ui._paging import (
    CappedCount,
    Page,
    decode_token,
    encode_token,
    view_columns,
)
from pgflow.ui._run_queries import (
    ACTIONS,
    ACTIVE_STATES,
    COUNT_CAP,
    RUN_STATES,
    ActionResult,
    RunFilter,
    act_on_run,
    run,
    run_history,
    run_state_counts,
    runs,
    status_counts,
    statuses,
    stuck_runs,
    workflows,
)

__all__ = [
    "ACTIONS",
    "ACTIVE_STATES",
    "COUNT_CAP",
    "LAG_CAP",
    "RUN_STATES",
    "ActionResult",
    "CappedCount",
    "Page",
    "RunFilter",
    "act_on_run",
    "consumer_lag",
    "dead_letters",
    "horizon",
    "query",
    "replay",
    "run",
    "run_history",
    "run_state_counts",
    "runs",
    "status_counts",
    "statuses",
    "stuck_runs",
    "view_columns",
    "workflows",
]


# --------------------------------------------------------------- dead letters
async def dead_letters(
    conn: AsyncConnection[Any],
    *,
    pending_only: bool = True,
    consumer: str | None = None,
    limit: int = 50,
    after: str | None = None,
) -> Page:
    """Dead letters, newest first, keyset-paginated on ``id``
    (:func:`pgflow.ops.dead_letters.list_dead_letters` with a page token)."""
    after_id = None
    if after:
        (last,) = decode_token(after, 1)
        if not last.isdigit():
            raise ValueError("bad page token")
        after_id = int(last)
    page = await _dead_letters.list_dead_letters(
        conn, pending_only=pending_only, consumer=consumer, limit=limit, after=after_id
    )
    token = encode_token(page.next_after) if page.next_after is not None else None
    return Page(page.rows, token)


async def replay(conn: AsyncConnection[Any], dead_letter_id: int) -> ActionResult:
    """Replay a dead letter exactly as ``pgflow dead-letters --replay ID`` does."""
    return ActionResult(await _dead_letters.replay_dead_letter(conn, dead_letter_id))


# ---------------------------------------------------------------------- query
async def query(conn: AsyncConnection[Any], sql: str, *, limit: int = 1000) -> InspectResult:
    """``pgflow inspect`` on ``conn``: validated, read-only, rolled back, time-limited."""
    return await inspect(conn, sql, limit=limit)
