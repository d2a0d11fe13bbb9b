"""``pgflow inspect "<SQL>"``: read-only queries over pgflow's views, validated first."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from pgflow.cli._common import add_command
from pgflow.cli._render import add_format_arguments, render, selected_format
from pgflow.ops.inspect import DEFAULT_LIMIT, DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT, inspect


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "inspect",
        "run a read-only SELECT over pgflow's views and tables",
        "Run one read-only SELECT over pgflow's views (runs, run_history, consumer_lag, "
        "stuck_runs, dead_letter_queue, run_counts, horizon). The query is validated "
        "first (an allow-list of syntax, functions and types; relations of schema "
        "pgflow only), then runs as the role pgflow_reader when the connecting role may "
        "assume it, in a READ ONLY transaction with a statement timeout and row and "
        "byte caps. Unqualified names mean pgflow.<name>.",
        epilog='example: pgflow inspect "SELECT step, at, from_status, status, change '
        "FROM run_history WHERE foreign_id = 'order-123' ORDER BY at, step\"",
    )
    parser.add_argument("sql", metavar="SQL", help="the query ('-' reads it from stdin)")
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
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"return at most this many bytes of rows (default {DEFAULT_MAX_BYTES})",
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
    if args.timeout <= 0 or args.limit < 1 or args.max_bytes < 1:
        print(
            "pgflow: error: --timeout, --limit and --max-bytes must be positive",
            file=sys.stderr,
        )
        return 2
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    result = asyncio.run(
        inspect(args.dsn, sql, timeout=args.timeout, limit=args.limit, max_bytes=args.max_bytes)
    )
    print(
        render(
            result.columns,
            result.rows,
            selected_format(args),
            max_width=args.width,
            truncated=result.truncated,
        )
    )
    if result.truncated and len(result.rows) < args.limit:
        print(f"pgflow: rows cut at the --max-bytes cap ({args.max_bytes} bytes)", file=sys.stderr)
    elif result.truncated and selected_format(args) != "table":
        print(
            f"pgflow: only the first {len(result.rows)} rows shown (--limit/--max-bytes)",
            file=sys.stderr,
        )
    return 0
