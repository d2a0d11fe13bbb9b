"""``pgflow prune``: delete old events, fired timeouts and replayed dead letters.

The rules (what is never deleted) live in :mod:`pgflow.ops.retention`; this module only
parses arguments and prints what was (or would be) deleted.
"""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from typing import Any

from psycopg import AsyncConnection

from pgflow.cli._common import add_command, connected
from pgflow.ops.retention import PruneResult, prune

__all__ = ["parse_age", "register"]

_AGE = re.compile(r"(\d+)([dhm])")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h`` or ``90m`` as a timedelta; anything else is an argparse error."""
    match = _AGE.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"invalid age {text!r}: use a positive number followed by d, h or m "
            "(e.g. 30d, 12h, 90m)"
        )
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid batch size {text!r}: use a positive integer")
    return value


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "prune",
        "delete old events nobody needs any more",
        "Delete events older than --older-than that every cursor of their stream has "
        "read and whose run (if any) is finished; also completed timeouts, replayed dead "
        "letters and change-log rows every reader has read, older than it. Streams "
        "without any cursor are kept unless --include-unconsumed. Pruned runs lose "
        "their history in pgflow.run_history.",
    )
    parser.add_argument(
        "--older-than",
        required=True,
        type=parse_age,
        metavar="AGE",
        help="minimum age of what is deleted: 30d, 12h or 90m",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    parser.add_argument(
        "--include-unconsumed",
        action="store_true",
        help="also prune streams that have no cursor at all (no consumer reads them)",
    )
    parser.add_argument(
        "--batch",
        type=_positive_int,
        default=10_000,
        help="rows per DELETE transaction (default 10000)",
    )
    parser.set_defaults(func=run)


async def _prune(conn: AsyncConnection[Any], args: argparse.Namespace) -> int:
    result = await prune(
        conn,
        older_than=args.older_than,
        dry_run=args.dry_run,
        batch=args.batch,
        include_unconsumed=args.include_unconsumed,
    )
    print(_report(result))
    return 0


run = connected(_prune)


def _report(result: PruneResult) -> str:
    verb = "would delete" if result.dry_run else "deleted"
    lines = [f"{verb} (older than {result.cutoff.isoformat(timespec='seconds')}):"]
    for stream, count in result.events_by_stream.items():
        lines.append(f"  events  {stream}: {count}")
    lines.append(f"  events total: {result.events}")
    lines.append(f"  timeouts: {result.timeouts}")
    lines.append(f"  dead letters: {result.dead_letters}")
    lines.append(f"  change log rows: {result.changes}")
    return "\n".join(lines)
