"""``pgflow inspect "<SQL>"``: read-only queries over pgflow's views, validated first."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .._table import add_format_arguments, render, selected_format
from ..inspect import DEFAULT_LIMIT, DEFAULT_TIMEOUT, inspect


def register(subparsers: Any) -> None:
    from . import add_dsn_argument

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "inspect",
        help="run a read-only SELECT over pgflow's views and tables",
        description=(
            "Run one read-only SELECT over pgflow's views (runs, run_history, "
            "consumer_lag, stuck_runs, dead_letter_queue, run_counts, horizon) and "
            "tables. The query is validated first (no writes, no locks, no other "
            "schemas, allow-listed functions only) and runs in a READ ONLY transaction "
            "with a statement timeout. Unqualified names mean pgflow.<name>."
        ),
        epilog=(
            'example: pgflow inspect "SELECT step, at, from_status, status, change '
            "FROM run_history WHERE foreign_id = 'order-123' ORDER BY at, step\""
        ),
    )
    parser.add_argument("sql", metavar="SQL", help="the query ('-' reads it from stdin)")
    add_dsn_argument(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"statement timeout in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"return at most this many rows (default {DEFAULT_LIMIT})",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=60,
        help="cut table cells longer than this (0: never; default 60)",
    )
    add_format_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0 or args.limit < 1:
        print("pgflow: error: --timeout and --limit must be positive", file=sys.stderr)
        return 2
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    result = asyncio.run(inspect(args.dsn, sql, timeout=args.timeout, limit=args.limit))
    print(
        render(
            result.columns,
            result.rows,
            selected_format(args),
            max_width=args.width,
            truncated=result.truncated,
        )
    )
    if result.truncated and selected_format(args) != "table":
        print(f"pgflow: only the first {args.limit} rows shown (--limit)", file=sys.stderr)
    return 0
