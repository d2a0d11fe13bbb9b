"""``pgflow migrate``: install or upgrade the schema."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from pgflow.cli._common import add_command
from pgflow.ops.migrations import latest_version, migrate


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "migrate",
        "install or upgrade the pgflow schema",
        "Apply pending migrations (numbered SQL files) under an advisory lock and "
        "refresh pgflow's views. Safe to run repeatedly and concurrently.",
    )
    parser.add_argument(
        "--repair-xid-reset",
        action="store_true",
        help="after restoring a dump into a new cluster, renumber stored event "
        "transaction ids so new events are delivered (stop workers first)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    applied = asyncio.run(migrate(args.dsn, repair_xid_reset=args.repair_xid_reset))
    if applied:
        print(
            f"applied migrations {', '.join(f'{v:04d}' for v in applied)}; "
            f"schema at version {latest_version()}"
        )
    else:
        print(f"schema up to date (version {latest_version()})")
    return 0
