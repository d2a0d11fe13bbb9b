"""The Runs, Run and Workflows pages' queries, and the actions on a run.

Each is shaped for an index of ``migrations/0010_ui_indexes.sql``: lists walk
``(created_at, run_id)`` keysets, counts are capped index scans, distinct workflows and
statuses come from a loose index scan. Actions go through :mod:`pgflow.workflow.actions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection

from pgflow.errors import NotFound
from pgflow.ui._paging import (
    CappedCount,
    Page,
    Row,
    capped,
    decode_token,
    encode_token,
    fetch_all,
    fetch_one,
)
from pgflow.workflow import actions
from pgflow.workflow.records import RunState

# no __all__: pgflow.ui._queries names what the console uses

RUN_STATES = tuple(str(s) for s in RunState)
ACTIVE_STATES = ("INITIATED", "RUNNING", "PAUSED")
#: default cap of every count the console shows ("10,000+")
COUNT_CAP = 10_000


# ------------------------------------------------------- workflows, statuses, counts
async def _distinct(conn: AsyncConnection[Any], column: str, workflow: str | None) -> list[str]:
    """Distinct values of ``column`` of ``pgflow.records`` (of one workflow's runs when
    given) by a loose index scan: one index probe per value, hopping through the
    ``(workflow, ...)`` / ``(workflow, status, ...)`` index, not a ``SELECT DISTINCT``
    over the table."""
    scope = "r.workflow = %(w)s AND" if workflow is not None else ""
    rows = await fetch_all(
        conn,
        f"""
        WITH RECURSIVE d(name) AS (
            (SELECT r.{column} FROM pgflow.records r WHERE {scope} true
             ORDER BY r.{column} LIMIT 1)
            UNION ALL
            SELECT (SELECT r.{column} FROM pgflow.records r
                    WHERE {scope} r.{column} > d.name ORDER BY r.{column} LIMIT 1)
            FROM d WHERE d.name IS NOT NULL
        )
        SELECT name FROM d WHERE name IS NOT NULL LIMIT 1000
        """,
        {"w": workflow},
    )
    return [r["name"] for r in rows]


async def workflows(conn: AsyncConnection[Any]) -> list[str]:
    """Workflow names that have runs."""
    return await _distinct(conn, "workflow", None)


async def statuses(conn: AsyncConnection[Any], workflow: str) -> list[str]:
    """Statuses runs of ``workflow`` are at."""
    return await _distinct(conn, "status", workflow)


async def _counts(
    conn: AsyncConnection[Any], column: str, values: Sequence[str], scope: str,
    params: dict[str, Any], cap: int,
) -> dict[str, CappedCount]:  # fmt: skip
    """Runs per value of ``column`` among ``values`` (and ``scope``), each count an
    index scan stopped at ``cap + 1``."""
    rows = await fetch_all(
        conn,
        f"""
        SELECT v.value, (SELECT count(*) FROM (
                   SELECT 1 FROM pgflow.records r
                   WHERE r.{column} = v.value {scope}
                   LIMIT %(cap)s + 1) x) AS n
        FROM unnest(%(values)s::text[]) AS v(value)
        """,
        {**params, "cap": cap, "values": list(values)},
    )
    return {r["value"]: capped(r["n"], cap) for r in rows}


async def run_state_counts(
    conn: AsyncConnection[Any], workflow: str | None, cap: int = COUNT_CAP
) -> dict[str, CappedCount]:
    """Runs per run state (capped), optionally of one workflow."""
    scope = "AND (%(w)s::text IS NULL OR r.workflow = %(w)s)"
    return await _counts(conn, "run_state", RUN_STATES, scope, {"w": workflow}, cap)


async def status_counts(
    conn: AsyncConnection[Any],
    workflow: str,
    names: Sequence[str],
    *,
    active_only: bool = False,
    cap: int = COUNT_CAP,
) -> dict[str, CappedCount]:
    """Runs of ``workflow`` per status (capped); ``active_only``: runs in progress only."""
    if not names:
        return {}
    # a literal predicate, so the planner can use the partial index of runs in progress
    active = "AND r.run_state IN ('INITIATED', 'RUNNING', 'PAUSED')" if active_only else ""
    scope = f"AND r.workflow = %(w)s {active}"
    return await _counts(conn, "status", names, scope, {"w": workflow}, cap)


# ----------------------------------------------------------------------- runs
@dataclass(frozen=True, slots=True)
class RunFilter:
    """The Runs page filters (all optional)."""

    workflow: str | None = None
    status: str | None = None
    run_state: str | None = None
    foreign_id_prefix: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def where(self) -> tuple[list[str], dict[str, Any]]:
        prefix = None
        if self.foreign_id_prefix:
            escaped = (
                self.foreign_id_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            )
            prefix = escaped + "%"
        filters = (
            ("r.workflow = %(workflow)s", "workflow", self.workflow),
            ("r.status = %(status)s", "status", self.status),
            ("r.run_state = %(run_state)s", "run_state", self.run_state),
            ("r.foreign_id LIKE %(prefix)s", "prefix", prefix),
            ("r.created_at >= %(after)s", "after", self.created_after),
            ("r.created_at < %(before)s", "before", self.created_before),
        )
        used = [(clause, name, value) for clause, name, value in filters if value]
        return [c for c, _, _ in used], {name: value for _, name, value in used}


_RUN_LIST_COLUMNS = (
    "r.run_id, r.workflow, r.foreign_id, r.status, r.run_state, r.err_count, r.created_at,"
    " r.updated_at, r.idle_for"
)


async def runs(
    conn: AsyncConnection[Any],
    flt: RunFilter,
    *,
    limit: int = 50,
    after: str | None = None,
    reason_column: bool = False,
) -> Page:
    """Runs, newest first, keyset-paginated on ``(created_at, run_id)``.

    Not :func:`pgflow.workflow.listing.list_records`, though it pages the same way:
    that lists one workflow's runs (the console lists all workflows' too, on index
    ``records_ui_created``), matches a whole foreign id (the console a prefix), takes
    ``created_after`` as exclusive (the console's "from" is inclusive) and returns
    ``pgflow.records`` columns (the console shows ``pgflow.runs``: ``idle_for``,
    ``run_state_reason``).
    """
    key: tuple[datetime, UUID] | None = None
    if after:
        created, run_id = decode_token(after, 2)
        try:
            key = (datetime.fromisoformat(created), UUID(run_id))
        except ValueError:
            raise ValueError("bad page token") from None
        if key[0].tzinfo is None:
            raise ValueError("bad page token")
        # btree does not combine a row comparison with a scalar bound on the same column
        # and may start its scan at the weaker one: keep only the stricter of the two
        if flt.created_before is not None:
            if key[0] < flt.created_before:
                flt = replace(flt, created_before=None)
            else:
                key = None
    clauses, params = flt.where()
    if key is not None:
        clauses.append("(r.created_at, r.run_id) < (%(k_at)s, %(k_id)s)")
        key_at, key_id = key
        params.update(k_at=key_at, k_id=key_id)
    cols = _RUN_LIST_COLUMNS + (", r.run_state_reason" if reason_column else "")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    params["limit"] = limit + 1
    rows = await fetch_all(
        conn,
        f"SELECT {cols} FROM pgflow.runs r {where}"
        " ORDER BY r.created_at DESC, r.run_id DESC LIMIT %(limit)s",
        params,
    )
    token = None
    if len(rows) > limit:
        rows = rows[:limit]
        token = encode_token(rows[-1]["created_at"], rows[-1]["run_id"])
    return Page(rows, token)


async def run(conn: AsyncConnection[Any], run_id: UUID) -> Row | None:
    """One run from ``pgflow.runs`` (every column the installed view has)."""
    return await fetch_one(conn, "SELECT * FROM pgflow.runs WHERE run_id = %s", [run_id])


async def run_history(conn: AsyncConnection[Any], rec: Row, limit: int = 1000) -> list[Row]:
    """Every transition of one run, in order (``pgflow.run_history``), with its reason."""
    return await fetch_all(
        conn,
        "SELECT h.step, h.from_status, h.status, h.change, h.run_state, h.version, h.at,"
        " h.after, h.event_id, h.trace_id, h.headers ->> 'reason' AS reason,"
        " h.headers ->> 'error' AS error"
        " FROM pgflow.run_history h"
        " WHERE h.workflow = %s AND h.foreign_id = %s AND h.run_id = %s"
        " ORDER BY h.step LIMIT %s",
        [rec["workflow"], rec["foreign_id"], rec["run_id"], limit],
    )


async def stuck_runs(
    conn: AsyncConnection[Any], workflow: str | None = None, limit: int = 50
) -> list[Row]:
    """Runs needing a look (``pgflow.stuck_runs``), longest-idle first."""
    return await fetch_all(
        conn,
        "SELECT run_id, workflow, foreign_id, status, run_state, reason, err_count,"
        " last_error, idle_for, next_timer_at, updated_at FROM pgflow.stuck_runs"
        " WHERE (%(w)s::text IS NULL OR workflow = %(w)s)"
        " ORDER BY updated_at LIMIT %(limit)s",
        {"w": workflow, "limit": limit},
    )


# -------------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True)
class ActionResult:
    message: str
    record: Mapping[str, Any] = field(default_factory=dict)


ACTIONS = ("retry", "pause", "resume", "cancel")
#: the actions whose form asks for a reason (stored as the run's run_state_reason)
_WITH_REASON = ("pause", "cancel")


async def act_on_run(
    conn: AsyncConnection[Any], run_id: UUID, action: str, reason: str | None
) -> ActionResult:
    """Apply ``action`` to a run through :mod:`pgflow.workflow.actions` (NotFound /
    InvalidTransition propagate with their one-line messages)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    rec = await run(conn, run_id)
    if rec is None:
        raise NotFound(f"no run {run_id}", run_id=run_id)
    wf, fid = rec["workflow"], rec["foreign_id"]
    apply = getattr(actions, action)
    new = await apply(conn, wf, fid, run_id, reason=reason if action in _WITH_REASON else None)
    return ActionResult(
        f"{action}: run {new.run_id} of {fid!r} is now {new.run_state}",
        {"run_state": str(new.run_state), "version": new.version},
    )
