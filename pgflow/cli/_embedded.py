"""``pgflow embedded``: manage the persistent embedded PostgreSQL used by the demo."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pgflow.cli._common import add_command
from pgflow.postgres import LocalCluster, default_data_dir


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "embedded",
        "start, stop or locate the embedded PostgreSQL (used when no DSN is given)",
        "The embedded PostgreSQL keeps its data under $PGFLOW_HOME/postgres (default "
        "~/.local/share/pgflow/postgres, or /var/lib/pgflow/postgres as root). `pgflow "
        "demo` starts it and leaves it running; stop it here.",
        dsn=False,
    )
    parser.add_argument("action", choices=["start", "stop", "status", "dsn"])
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="cluster directory (default: see above)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.data_dir or default_data_dir())
    if args.action == "start":
        print(cluster.start())
    elif args.action == "stop":
        cluster.stop()
        print(f"stopped (data kept in {cluster.data_dir})")
    elif args.action == "status":
        if not cluster.initialised():
            print(f"not initialised ({cluster.data_dir})")
            return 3
        state = "running" if cluster.running() else "stopped"
        print(f"{state}: {cluster.dsn} (data in {cluster.data_dir})")
        return 0 if state == "running" else 3
    else:
        print(cluster.dsn)
    return 0
