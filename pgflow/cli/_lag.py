"""``pgflow lag``: how far behind each consumer shard is, and the oldest open transaction.

Both come from views (``pgflow.consumer_lag``, ``pgflow.horizon``), so psql users see
the same numbers. The horizon line matters because a consumer cannot read past the
oldest transaction holding an xid: its own events wait for it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from psycopg import AsyncConnection

from pgflow.cli._common import add_command, connected, fetch
from pgflow.cli._render import (
    add_format_arguments,
    format_interval,
    render,
    render_json,
    render_table,
    selected_format,
)

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers,
        "lag",
        "consumer lag per consumer and shard, and the oldest open transaction",
        "How far behind each consumer shard is (pgflow.consumer_lag), and how old the "
        "oldest transaction holding an xid is (pgflow.horizon): its own events wait for "
        "it, and it holds back VACUUM and pgflow prune.",
    )
    add_format_arguments(p)
    p.set_defaults(func=connected(_lag))


async def _lag(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    fmt = selected_format(args)
    cols, rows = await fetch(
        conn,
        "SELECT consumer, shard, shard_count, stream, lag_events, lag_seconds,"
        " oldest_pending_at, updated_at AS cursor_moved_at, cursor_tx::text AS cursor_tx,"
        " cursor_id FROM pgflow.consumer_lag ORDER BY consumer, shard",
    )
    hcols, hrows = await fetch(conn, "SELECT * FROM pgflow.horizon")
    if fmt == "json":
        data = json.loads(render_json(cols, rows))
        hz = json.loads(render_json(hcols, hrows))[0] if hrows else None
        print(json.dumps({"consumers": data, "horizon": hz}, indent=2))
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
    print(_horizon_line(dict(zip(hcols, hrows[0], strict=True)) if hrows else {}))
    return 0


def _horizon_line(horizon: dict[str, Any]) -> str:
    """The oldest open transaction, who holds it, and (past a minute) why that matters."""
    age = float(horizon.get("age_seconds") or 0.0)
    line = f"oldest open transaction: {format_interval(age)}"
    if horizon.get("xact_start") is None:
        return line
    who = horizon.get("prepared_gid") and f"prepared transaction {horizon['prepared_gid']!r}"
    app = horizon.get("application_name")
    who = who or (
        f"pid {horizon.get('pid')} ({horizon.get('usename')}"
        f"{', ' + str(app) if app else ''}, {horizon.get('state')})"
    )
    line += f" — {who}"
    if age >= 60:
        line += "; its own events wait for it, and it holds back VACUUM and prune"
    return line
