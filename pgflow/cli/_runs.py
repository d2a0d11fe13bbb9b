"""Seeing runs: ``pgflow runs`` · ``pgflow show FOREIGN_ID`` · ``pgflow stuck``.

Reads go through the views in ``sql/views.sql`` (so psql users see the same thing).
:func:`resolve_run` — which run a foreign id (and ``--workflow`` / ``--run-id``) means —
is shared with the commands that act on runs (:mod:`pgflow.cli._actions`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import AsyncConnection

from pgflow import _db
from pgflow.cli._common import add_command, connected, fetch
from pgflow.cli._render import (
    add_format_arguments,
    render,
    render_json,
    render_limited,
    render_record,
    render_table,
    selected_format,
)
from pgflow.errors import ConfigError, NotFound

__all__ = ["register", "resolve_run"]

_STATES = (
    "INITIATED",
    "RUNNING",
    "PAUSED",
    "COMPLETED",
    "CANCELLED",
    "REQUESTED_DATA_DELETED",
    "DATA_DELETED",
)


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers,
        "runs",
        "list runs (newest activity first)",
        "List runs from pgflow.runs, most recently moved first.",
    )
    p.add_argument("--workflow", help="only this workflow")
    p.add_argument("--status", help="only runs at this status (the status name)")
    p.add_argument(
        "--state",
        type=str.upper,
        choices=_STATES,
        metavar="STATE",
        help="only runs in this run state (running, paused, completed, ...)",
    )
    p.add_argument("--active", action="store_true", help="only runs in progress")
    p.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    add_format_arguments(p)
    p.set_defaults(func=connected(_runs))

    p = add_command(
        subparsers,
        "show",
        "one run: its record and every transition",
        "Show the latest run of FOREIGN_ID in each workflow (or the one given): the "
        "record, then its history from pgflow.run_history.",
    )
    p.add_argument("foreign_id", metavar="FOREIGN_ID")
    p.add_argument("--workflow", help="only this workflow")
    p.add_argument("--run-id", help="this run (a unique prefix is enough)")
    p.add_argument("--all-runs", action="store_true", help="every run, not just the latest")
    add_format_arguments(p)
    p.set_defaults(func=connected(_show))

    p = add_command(
        subparsers,
        "stuck",
        "runs that are paused, failing, or not moving",
        "List pgflow.stuck_runs: runs in progress that are paused, have errors, or have "
        "not moved for longer than --after.",
    )
    p.add_argument(
        "--after",
        default=None,
        help="how long without moving counts as stuck, as a PostgreSQL interval "
        "(default: pgflow.stuck_after, 15 minutes)",
    )
    p.add_argument("--workflow", help="only this workflow")
    p.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    add_format_arguments(p)
    p.set_defaults(func=connected(_stuck))


def _where(
    filters: list[tuple[str, Any]], *, always: tuple[str, Any] | None = None
) -> tuple[str, list[Any]]:
    """`` WHERE a = %s AND ...`` (or ``""``) of ``always`` and the ``(clause, value)``
    filters whose option was given; a clause without ``%s`` (``active``) is a flag."""
    used = ([always] if always else []) + [(c, v) for c, v in filters if v]
    if not used:
        return "", []
    params = [value for clause, value in used if "%s" in clause]
    return " WHERE " + " AND ".join(clause for clause, _ in used), params


# -------------------------------------------------------------------------- runs
_RUN_COLUMNS = (
    "workflow, foreign_id, run_id, status, run_state, err_count, idle_for, updated_at,"
    " last_error, run_state_reason"
)


async def _runs(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    where, params = _where(
        [
            ("workflow = %s", args.workflow),
            ("status = %s", args.status),
            ("run_state = %s", args.state),
            ("active", args.active),
        ]
    )
    fmt = selected_format(args)
    columns = "*" if fmt != "table" else _RUN_COLUMNS
    sql = f"SELECT {columns} FROM pgflow.runs{where} ORDER BY updated_at DESC LIMIT %s"
    cols, rows = await fetch(conn, sql, [*params, args.limit + 1])
    print(render_limited(cols, rows, fmt, args.limit))
    return 0


# -------------------------------------------------------------------------- show
@dataclass(frozen=True, slots=True)
class _Run:
    workflow: str
    foreign_id: str
    run_id: UUID


async def resolve_run(
    conn: AsyncConnection[Any],
    foreign_id: str,
    workflow: str | None = None,
    run_id: str | None = None,
    *,
    all_runs: bool = False,
    single: bool = False,
) -> list[_Run]:
    """Runs of ``foreign_id`` (latest per workflow, or all), optionally narrowed by
    workflow and run-id prefix. ``single`` insists on exactly one (for actions)."""
    prefix = run_id.lower().replace("%", "").replace("_", "") + "%" if run_id else None
    where, params = _where(
        [("workflow = %s", workflow), ("run_id::text LIKE %s", prefix)],
        always=("foreign_id = %s", foreign_id),
    )
    sql = (
        f"SELECT workflow, foreign_id, run_id FROM pgflow.records{where}"
        " ORDER BY workflow, created_at DESC, version DESC"
    )
    _, rows = await fetch(conn, sql, params)
    if not rows:
        what = f"workflow {workflow!r}: " if workflow else ""
        which = f"run {run_id}" if run_id else "run"
        raise NotFound(
            f"{what}no {which} for foreign id {foreign_id!r}",
            workflow=workflow or None,
            foreign_id=foreign_id,
        )
    runs = [_Run(r[0], r[1], r[2]) for r in rows]
    if run_id:
        if len(runs) > 1:
            ids = ", ".join(str(r.run_id) for r in runs[:5])
            raise ConfigError(f"run id prefix {run_id!r} matches several runs ({ids})")
        return runs
    if not all_runs:
        latest: dict[str, _Run] = {}
        for run in runs:
            latest.setdefault(run.workflow, run)
        runs = list(latest.values())
    if single and len(runs) > 1:
        names = ", ".join(sorted({r.workflow for r in runs}))
        raise ConfigError(
            f"foreign id {foreign_id!r} has runs in several workflows ({names}): pass --workflow"
        )
    return runs


_OPTIONAL = frozenset({"last_error", "retry_at", "trace_id", "run_state_reason"})
_HISTORY_COLUMNS = (
    "step, at, after, from_status, status, change, run_state, reason, version, trace_id"
)


def _record_block(run: _Run, record: dict[str, Any], hcols: list[str], hrows: list[Any]) -> str:
    """A run as a table: its record (psql's expanded display), the stored traceback of
    its last error, then its history."""
    shown = [
        (k, v)
        for k, v in record.items()
        if k not in ("traceparent", "meta") and not (k in _OPTIONAL and v is None)
    ]
    error = record.get("last_error")
    if error:  # its first line in the record, the stored traceback below it
        shown = [(k, error.splitlines()[0] if k == "last_error" else v) for k, v in shown]
    blocks = [
        render_record(shown, title=f"== {run.workflow} / {run.foreign_id} / run {run.run_id}")
    ]
    if error and "\n" in error:
        blocks.append("\n".join("  " + line for line in error.splitlines()[1:]))
    blocks.append(render_table(hcols, hrows, footer=False))
    return "\n\n".join(blocks)


async def _show(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    runs = await resolve_run(
        conn, args.foreign_id, args.workflow, args.run_id, all_runs=args.all_runs
    )
    fmt = selected_format(args)
    out_json: list[dict[str, Any]] = []
    csv_rows: list[tuple[Any, ...]] = []
    csv_cols: list[str] = []
    blocks: list[str] = []
    for run in runs:
        rcols, rrows = await fetch(
            conn, "SELECT * FROM pgflow.runs WHERE run_id = %s", [run.run_id]
        )
        hist_select = "*" if fmt != "table" else _HISTORY_COLUMNS
        hcols, hrows = await fetch(
            conn,
            f"SELECT {hist_select} FROM pgflow.run_history WHERE workflow = %s"
            " AND foreign_id = %s AND run_id = %s ORDER BY step",
            [run.workflow, run.foreign_id, run.run_id],
        )
        if fmt == "json":
            out_json.append(
                {
                    "record": json.loads(render_json(rcols, rrows))[0],
                    "history": json.loads(render_json(hcols, hrows)),
                }
            )
        elif fmt == "csv":
            csv_cols = hcols
            csv_rows += hrows
        else:
            record = dict(zip(rcols, rrows[0], strict=True))
            blocks.append(_record_block(run, record, hcols, hrows))
    if fmt == "json":
        print(json.dumps(out_json, indent=2, ensure_ascii=False))
    elif fmt == "csv":
        print(render(csv_cols, csv_rows, "csv"))
    else:
        print("\n\n".join(blocks))
    return 0


# ------------------------------------------------------------------------- stuck
async def _stuck(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    fmt = selected_format(args)
    cols = (
        "*"
        if fmt != "table"
        else "workflow, foreign_id, run_id, status, run_state, reason, err_count,"
        " idle_for, next_timer_at, last_error"
    )
    where, params = _where([("workflow = %s", args.workflow)])
    sql = f"SELECT {cols} FROM pgflow.stuck_runs{where} ORDER BY updated_at LIMIT %s"
    # The threshold is a transaction-local setting read by the view, in the same
    # transaction as the query: a session SET would be lost behind a transaction pooler.
    async with conn.transaction():
        if args.after:
            try:
                await conn.execute(
                    "SELECT set_config('pgflow.stuck_after', %s::interval::text, true)",
                    [args.after],
                )
            except psycopg.errors.DataError as exc:
                raise ConfigError(f"--after {args.after!r}: {_db.first_line(exc)}") from None
        names, rows = await fetch(conn, sql, [*params, args.limit + 1])
    print(render_limited(names, rows, fmt, args.limit))
    return 0
