"""Operator commands over pgflow's views: see runs, lag and history; act on runs.

``pgflow runs`` · ``pgflow lag`` · ``pgflow show FOREIGN_ID`` · ``pgflow stuck`` ·
``pgflow retry|pause|resume|cancel FOREIGN_ID`` · ``pgflow dead-letters [--replay ID]``.

Reads go through the views in ``sql/views.sql`` (so psql users see the same thing);
run-state changes go through :mod:`pgflow.workflow.actions`, the same functions the Python API
uses, so the CLI cannot do anything the engine would not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import AsyncConnection

from pgflow import _db
from pgflow.cli import with_connection
from pgflow.cli._render import (
    add_format_arguments,
    format_interval,
    render,
    render_json,
    render_record,
    render_table,
    selected_format,
)
from pgflow.errors import ConfigError, InvalidTransition, NotFound, PgflowError
from pgflow.log.names import split_shard

__all__ = ["ReplayFailed", "register", "replay_dead_letter", "resolve_run"]

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
    from pgflow.cli import add_dsn_argument

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subparsers.add_parser(
            name, help=help, description=description
        )
        add_dsn_argument(parser)
        return parser

    p = command(
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
    p.set_defaults(func=_sync(_runs))

    p = command(
        "lag",
        "consumer lag per consumer and shard, and the oldest open transaction",
        "How far behind each consumer shard is (pgflow.consumer_lag), and how old the "
        "oldest transaction holding an xid is (pgflow.horizon): its own events wait for "
        "it, and it holds back VACUUM and pgflow prune.",
    )
    add_format_arguments(p)
    p.set_defaults(func=_sync(_lag))

    p = command(
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
    p.set_defaults(func=_sync(_show))

    p = command(
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
    p.set_defaults(func=_sync(_stuck))

    for verb, text in (
        ("retry", "run a run's current step again now (resets errors, unpauses)"),
        ("pause", "pause a run in progress"),
        ("resume", "resume a paused run (its current step runs again)"),
        ("cancel", "cancel a run for good"),
        ("delete-data", "request erasure of a finished run's data (a worker erases it)"),
    ):
        p = command(verb, text, f"{text[0].upper()}{text[1:]}. Uses the newest run unless "
                    "--run-id is given; --workflow is needed when the foreign id has runs "
                    "in several workflows.")  # fmt: skip
        p.add_argument("foreign_id", metavar="FOREIGN_ID")
        p.add_argument("--workflow", help="the workflow (needed if ambiguous)")
        p.add_argument("--run-id", help="this run (a unique prefix is enough)")
        p.add_argument(
            "--reason", help="why (stored on the record: run_state_reason in pgflow.runs)"
        )
        p.set_defaults(func=_sync(_admin_action), verb=verb)

    p = command(
        "dead-letters",
        "list dead letters, or replay one",
        "List pending dead letters (pgflow.dead_letter_queue), or with --replay ID "
        "submit one again and mark it replayed.",
    )
    p.add_argument("--replay", type=int, metavar="ID", help="replay this dead letter")
    p.add_argument(
        "--target",
        metavar="MODULE:ATTR",
        help="with --replay of a connector's dead letter: the workflow (as for `pgflow "
        "worker`) whose connector function gets the event again",
    )
    p.add_argument("--consumer", help="only this consumer")
    p.add_argument("--all", action="store_true", help="include replayed ones")
    p.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    add_format_arguments(p)
    p.set_defaults(func=_sync(_dead_letters))


# ----------------------------------------------------------------------- plumbing
Handler = Callable[[AsyncConnection[Any], argparse.Namespace], Awaitable[int]]


def _sync(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        limit = getattr(args, "limit", 1)
        if limit is not None and limit < 1:
            raise ConfigError("--limit must be positive")
        return asyncio.run(with_connection(args.dsn, lambda conn: handler(conn, args)))

    return run


async def _fetch(
    conn: AsyncConnection[Any], sql: str, params: Sequence[Any] | dict[str, Any] = ()
) -> tuple[list[str], list[tuple[Any, ...]]]:
    cur = await conn.execute(sql, params)
    rows = [tuple(r) for r in await cur.fetchall()]
    return [d.name for d in cur.description or ()], rows


def _short(run_id: Any) -> str:
    return str(run_id)[:8] if run_id is not None else ""


def _with_short_ids(
    columns: list[str], rows: list[tuple[Any, ...]], fmt: str
) -> list[tuple[Any, ...]]:
    """Tables show run ids as 8-character prefixes (enough for --run-id); JSON/CSV full."""
    if fmt != "table" or "run_id" not in columns:
        return rows
    i = columns.index("run_id")
    return [(*r[:i], _short(r[i]), *r[i + 1 :]) for r in rows]


# -------------------------------------------------------------------------- runs
_RUN_COLUMNS = (
    "workflow, foreign_id, run_id, status, run_state, err_count, idle_for, updated_at,"
    " last_error, run_state_reason"
)


async def _runs(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    where, params = [], []
    if args.workflow:
        where.append("workflow = %s")
        params.append(args.workflow)
    if args.status:
        where.append("status = %s")
        params.append(args.status)
    if args.state:
        where.append("run_state = %s")
        params.append(args.state)
    if args.active:
        where.append("active")
    fmt = selected_format(args)
    columns = "*" if fmt != "table" else _RUN_COLUMNS
    sql = f"SELECT {columns} FROM pgflow.runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY updated_at DESC LIMIT %s"
    cols, rows = await _fetch(conn, sql, [*params, args.limit + 1])
    truncated = len(rows) > args.limit
    rows = _with_short_ids(cols, rows[: args.limit], fmt)
    print(render(cols, rows, fmt, truncated=truncated))
    return 0


# --------------------------------------------------------------------------- lag
async def _lag(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    fmt = selected_format(args)
    cols, rows = await _fetch(
        conn,
        "SELECT consumer, shard, shard_count, stream, lag_events, lag_seconds,"
        " oldest_pending_at, updated_at AS cursor_moved_at, cursor_tx::text AS cursor_tx,"
        " cursor_id FROM pgflow.consumer_lag ORDER BY consumer, shard",
    )
    hcols, hrows = await _fetch(conn, "SELECT * FROM pgflow.horizon")
    horizon = dict(zip(hcols, hrows[0], strict=True)) if hrows else {}
    if fmt == "json":
        data = json.loads(render_json(cols, rows))
        print(json.dumps({"consumers": data, "horizon": json.loads(render_json(hcols, hrows))[0]
                          if hrows else None}, indent=2))  # fmt: skip
        return 0
    if fmt == "csv":
        print(render(cols, rows, "csv"))
        return 0
    table_rows = [
        (
            r[0],
            f"{r[1]}/{r[2]}" if r[2] > 1 else "-",
            r[3],
            r[4],
            format_interval(r[5]) if r[4] else "0",
            r[6],
            r[7],
        )
        for r in rows
    ]
    print(
        render_table(
            ["consumer", "shard", "stream", "lag_events", "lag", "oldest_pending", "cursor_moved"],
            table_rows,
        )
    )
    age = float(horizon.get("age_seconds") or 0.0)
    line = f"oldest open transaction: {format_interval(age)}"
    if horizon.get("xact_start") is not None:
        who = horizon.get("prepared_gid") and f"prepared transaction {horizon['prepared_gid']!r}"
        who = who or (
            f"pid {horizon.get('pid')} ({horizon.get('usename')}"
            f"{', ' + str(horizon['application_name']) if horizon.get('application_name') else ''}"
            f", {horizon.get('state')})"
        )
        line += f" — {who}"
        if age >= 60:
            line += "; its own events wait for it, and it holds back VACUUM and prune"
    print(line)
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
    where, params = ["foreign_id = %s"], [foreign_id]
    if workflow:
        where.append("workflow = %s")
        params.append(workflow)
    if run_id:
        where.append("run_id::text LIKE %s")
        params.append(run_id.lower().replace("%", "").replace("_", "") + "%")
    sql = (
        "SELECT workflow, foreign_id, run_id FROM pgflow.records WHERE "
        + " AND ".join(where)
        + " ORDER BY workflow, created_at DESC, version DESC"
    )
    _, rows = await _fetch(conn, sql, params)
    if not rows:
        what = f"workflow {workflow!r}: " if workflow else ""
        which = f"run {run_id}" if run_id else "run"
        raise NotFound(f"{what}no {which} for foreign id {foreign_id!r}")
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
        rcols, rrows = await _fetch(
            conn, "SELECT * FROM pgflow.runs WHERE run_id = %s", [run.run_id]
        )
        hist_select = "*" if fmt != "table" else _HISTORY_COLUMNS
        hcols, hrows = await _fetch(
            conn,
            f"SELECT {hist_select} FROM pgflow.run_history WHERE workflow = %s"
            " AND foreign_id = %s AND run_id = %s ORDER BY step",
            [run.workflow, run.foreign_id, run.run_id],
        )
        record = dict(zip(rcols, rrows[0], strict=True))
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
            shown = [
                (k, v)
                for k, v in record.items()
                if k not in ("traceparent", "meta") and not (k in _OPTIONAL and v is None)
            ]
            error = record.get("last_error")
            if error:  # its first line in the record, the stored traceback below it
                shown = [(k, error.splitlines()[0] if k == "last_error" else v) for k, v in shown]
            title = f"== {run.workflow} / {run.foreign_id} / run {run.run_id}"
            blocks.append(render_record(shown, title=title))
            if error and "\n" in error:
                blocks.append("\n".join("  " + line for line in error.splitlines()[1:]))
            blocks.append(render_table(hcols, hrows, footer=False))
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
    sql = f"SELECT {cols} FROM pgflow.stuck_runs"
    params: list[Any] = []
    if args.workflow:
        sql += " WHERE workflow = %s"
        params.append(args.workflow)
    sql += " ORDER BY updated_at LIMIT %s"
    params.append(args.limit + 1)
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
        names, rows = await _fetch(conn, sql, params)
    truncated = len(rows) > args.limit
    print(render(names, _with_short_ids(names, rows[: args.limit], fmt), fmt, truncated=truncated))
    return 0


# ------------------------------------------------------------------------ actions
async def _admin_action(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    from pgflow.workflow import actions

    (run,) = await resolve_run(conn, args.foreign_id, args.workflow, args.run_id, single=True)
    action = {
        "retry": actions.retry,
        "pause": actions.pause,
        "resume": actions.resume,
        "cancel": actions.cancel,
        # only requests it: a running worker erases it with the workflow's custom_delete
        "delete-data": actions.request_data_deletion,
    }[args.verb]
    rec = await action(conn, run.workflow, run.foreign_id, run.run_id, reason=args.reason)
    why = f" — {rec.run_state_reason}" if rec.run_state_reason else ""
    print(
        f"{args.verb}: {rec.workflow} / {rec.foreign_id} / run {rec.run_id}: "
        f"{rec.status} ({rec.run_state}){why}"
    )
    return 0


# ------------------------------------------------------------------ dead letters
async def _dead_letters(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    if args.replay is not None:
        if args.target:
            print(await _replay_through_connector(conn, args.replay, args.target, args.dsn))
        else:
            print(await replay_dead_letter(conn, args.replay))
        return 0
    if args.target:
        raise ConfigError("--target only goes with --replay ID")
    fmt = selected_format(args)
    cols = (
        "*"
        if fmt != "table"
        else "id, consumer, foreign_id, type, reason, attempts, state, age, event_id"
    )
    where, params = [], []
    if not args.all:
        where.append("state = 'pending'")
    if args.consumer:
        where.append("consumer = %s")
        params.append(args.consumer)
    sql = f"SELECT {cols} FROM pgflow.dead_letter_queue"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id LIMIT %s"
    params.append(args.limit + 1)
    names, rows = await _fetch(conn, sql, params)
    truncated = len(rows) > args.limit
    print(render(names, rows[: args.limit], fmt, truncated=truncated))
    return 0


class ReplayFailed(PgflowError):
    """The connector function raised again while replaying a dead letter."""


def _connector_of(consumer: str, workflow: str) -> str | None:
    """The connector name in a dead letter's ``consumer`` if it belongs to ``workflow``.

    The runner stores ``"<workflow>--<connector>"``
    (:func:`pgflow.workflow._connectors.dead_letter_consumer`); a consumer name with its
    shard suffix (``"<workflow>--<connector>-1-of-2"``) is accepted too. Matching the
    known workflow name, rather than splitting at a ``--``, stays right when a name
    itself contains ``--``.
    """
    prefix = f"{workflow}--"
    if not consumer.startswith(prefix) or len(consumer) == len(prefix):
        return None
    return consumer[len(prefix) :]


async def _replay_through_connector(
    conn: AsyncConnection[Any], dead_letter_id: int, target: str, dsn: str | None
) -> str:
    """Give a connector's dead letter to its connector function again (``--target``).

    The function runs through the workflow's API bound to one transaction that also
    marks the dead letter replayed: either both commit or neither does.
    """
    from pgflow.cli._worker import build_workflow
    from pgflow.connectors._base import ConnectorEvent
    from pgflow.observability import connector_span

    cur = await conn.execute(
        "SELECT consumer, event_id, foreign_id, type, headers, replayed_at"
        " FROM pgflow.dead_letters WHERE id = %s",
        [dead_letter_id],
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no dead letter with id {dead_letter_id}")
    consumer, event_id, foreign_id, type_, headers, replayed_at = row
    if replayed_at is not None:
        raise InvalidTransition(f"dead letter {dead_letter_id} was already replayed")
    if "--" not in consumer:
        raise ConfigError(
            f"dead letter {dead_letter_id} is not a connector's (consumer {consumer!r}); "
            "replay it without --target"
        )
    if foreign_id is None or type_ is None:
        raise InvalidTransition(
            f"dead letter {dead_letter_id} is a malformed message (no foreign id or type): "
            "fix it at the source and send it again"
        )
    wf = build_workflow(target, dsn or _db.resolve_dsn(None))
    try:
        connector = _connector_of(consumer, wf.name)
        if connector is None:
            raise ConfigError(
                f"{target} is workflow {wf.name!r}, but the dead letter belongs to "
                f"{consumer.split('--', 1)[0]!r} (consumer {consumer!r})"
            )
        spec = wf.graph.connectors.get(connector) or wf.graph.connectors.get(
            (split_shard(connector) or (connector,))[0]
        )
        if spec is None:
            raise ConfigError(f"workflow {wf.name!r} has no connector {connector!r}")
        event = ConnectorEvent(
            id=event_id,
            foreign_id=foreign_id,
            type=type_,
            headers={str(k): str(v) for k, v in dict(headers or {}).items()},
        )
        async with conn.transaction():
            cur = await conn.execute(
                "UPDATE pgflow.dead_letters SET replayed_at = now()"
                " WHERE id = %s AND replayed_at IS NULL",
                [dead_letter_id],
            )
            if cur.rowcount != 1:
                raise InvalidTransition(f"dead letter {dead_letter_id} was already replayed")
            attributes = {
                "workflow": wf.name,
                "foreign_id": foreign_id,
                "replay_of": dead_letter_id,
            }
            try:
                with connector_span(spec.name, event_id, attributes, headers=event.headers):
                    await spec.fn(wf.bind(conn), event)
            except PgflowError:
                raise
            except Exception as exc:
                raise ReplayFailed(
                    f"replay of dead letter {dead_letter_id} failed, nothing changed (it "
                    f"stays pending): {type(exc).__name__}: {_db.first_line(exc)}"
                ) from exc
    finally:
        await wf.close()
    return (
        f"replayed dead letter {dead_letter_id}: connector {spec.name} of {wf.name} "
        f"handled event {event_id} for {foreign_id!r}"
    )


async def replay_dead_letter(conn: AsyncConnection[Any], dead_letter_id: int) -> str:
    """Submit dead letter ``dead_letter_id`` again and mark it replayed (one transaction).

    * A dead letter of a workflow run (its foreign id has a run in progress in a
      workflow the consumer belongs to): :func:`pgflow.actions.retry` — the run's current
      step runs again with its error count reset.
    * Any other dead letter (a connector's malformed or failed outside event): a copy
      is appended to ``pgflow.events`` on stream ``pgflow.replay`` with the original
      consumer, event id, type, headers and payload in its headers, for an operator's
      fixed-up consumer (or ``pgflow.connectors.table``) to pick up.

    Returns a one-line description of what was done.
    """
    from pgflow.log.events import NewEvent, append
    from pgflow.workflow import actions

    async with conn.transaction():
        cur = await conn.execute(
            "SELECT id, consumer, event_id, foreign_id, type, headers, payload, replayed_at"
            " FROM pgflow.dead_letters WHERE id = %s FOR UPDATE",
            [dead_letter_id],
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"no dead letter with id {dead_letter_id}")
        _, consumer, event_id, foreign_id, type_, headers, payload, replayed_at = row
        if replayed_at is not None:
            raise InvalidTransition(
                f"dead letter {dead_letter_id} was already replayed at "
                f"{replayed_at:%Y-%m-%d %H:%M:%S}"
            )
        run = None
        if foreign_id:
            cur = await conn.execute(
                "SELECT workflow, run_id FROM pgflow.records WHERE foreign_id = %s"
                " AND run_state IN ('INITIATED', 'RUNNING', 'PAUSED')"
                # step consumers are named "<workflow>/<STATUS>"
                " AND (%s = workflow OR starts_with(%s, workflow || '/'))"
                " ORDER BY created_at DESC LIMIT 1",
                [foreign_id, consumer, consumer],
            )
            run = await cur.fetchone()
        if run is not None:
            rec = await actions.retry(conn, run[0], foreign_id, run[1])
            done = (
                f"replayed dead letter {dead_letter_id}: retried {rec.workflow} / "
                f"{rec.foreign_id} / run {rec.run_id} at {rec.status}"
            )
        else:
            replay_headers = {str(k): str(v) for k, v in dict(headers or {}).items()}
            replay_headers.update(
                {
                    "replay_of": str(dead_letter_id),
                    "consumer": consumer,
                    "event_id": event_id,
                    "type": type_ or "",
                }
            )
            if payload is not None:
                replay_headers["payload"] = json.dumps(payload, separators=(",", ":"))
            (new_id,) = await append(
                conn,
                [
                    NewEvent(
                        stream="pgflow.replay",
                        type=type_ or "replay",
                        foreign_id=foreign_id or event_id,
                        headers=replay_headers,
                    )
                ],
            )
            done = (
                f"replayed dead letter {dead_letter_id}: appended event {new_id} "
                f"to stream pgflow.replay for consumer {consumer}"
            )
        await conn.execute(
            "UPDATE pgflow.dead_letters SET replayed_at = now() WHERE id = %s", [dead_letter_id]
        )
    return done
