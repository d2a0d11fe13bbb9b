"""``pgflow dead-letters [--replay ID [--target MODULE:ATTR]]``: list or replay dead letters.

A thin face of :mod:`pgflow.ops.dead_letters` (which the web console uses too): this
module only parses arguments, loads the ``--target`` workflow and prints.
"""

from __future__ import annotations

import argparse
from typing import Any

from psycopg import AsyncConnection

from pgflow import _db
from pgflow.cli._common import add_command, build_workflow, connected
from pgflow.cli._render import add_format_arguments, render, selected_format
from pgflow.errors import ConfigError
from pgflow.ops import dead_letters

__all__ = ["register"]

#: the table's columns (JSON and CSV get every column of pgflow.dead_letter_queue)
_TABLE_COLUMNS = (
    "id", "consumer", "foreign_id", "type", "reason", "attempts", "state", "age", "event_id"
)  # fmt: skip


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers,
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
    p.set_defaults(func=connected(_dead_letters))


async def _dead_letters(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    if args.replay is not None:
        if args.target:
            print(await _replay_through(conn, args.replay, args.target, args.dsn))
        else:
            print(await dead_letters.replay_dead_letter(conn, args.replay))
        return 0
    if args.target:
        raise ConfigError("--target only goes with --replay ID")
    page = await dead_letters.list_dead_letters(
        conn,
        pending_only=not args.all,
        consumer=args.consumer or None,
        newest_first=False,
        limit=args.limit,
    )
    fmt = selected_format(args)
    if fmt == "table":
        names = list(_TABLE_COLUMNS)
    else:
        names = list(page.rows[0]) if page.rows else await _view_columns(conn)
    rows = [tuple(r[c] for c in names) for r in page.rows]
    print(render(names, rows, fmt, truncated=page.next_after is not None))
    return 0


async def _view_columns(conn: AsyncConnection[Any]) -> list[str]:
    """Column names of pgflow.dead_letter_queue (a CSV of no rows still has a header)."""
    cur = await conn.execute("SELECT * FROM pgflow.dead_letter_queue LIMIT 0")
    return [d.name for d in cur.description or ()]


async def _replay_through(
    conn: AsyncConnection[Any], dl_id: int, target: str, dsn: str | None
) -> str:
    # The dead letter is checked before the target is loaded: nothing of the user's
    # module runs for a dead letter that cannot be replayed through a connector.
    dead_letter = await dead_letters.connector_dead_letter(conn, dl_id)
    wf = build_workflow(target, dsn or _db.resolve_dsn(None))
    try:
        return await dead_letters.replay_through_connector(conn, dead_letter, wf)
    finally:
        await wf.close()
