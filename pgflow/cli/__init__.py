"""The ``pgflow`` command line.

Each command group lives in its own module exposing ``register(subparsers)``; the
module list below is the whole command set, in the order ``pgflow --help`` lists it.
What they share (``--dsn``, connecting, loading ``MODULE:ATTR``) is in ``_common``,
how they print rows in ``_render``. Errors pgflow raises on purpose are printed as one
line and exit with status 1; bad arguments exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from pgflow.cli._common import add_dsn_argument, pooler_env, with_connection
from pgflow.errors import PgflowError

__all__ = ["COMMAND_MODULES", "add_dsn_argument", "build_parser", "main", "with_connection"]

COMMAND_MODULES = [
    "pgflow.cli._migrate",
    "pgflow.cli._embedded",
    "pgflow.cli._inspect",
    "pgflow.cli._runs",
    "pgflow.cli._lag",
    "pgflow.cli._actions",
    "pgflow.cli._dead_letters",
    "pgflow.cli._demo",
    "pgflow.cli._worker",
    "pgflow.cli._graph",
    "pgflow.cli._prune",
    "pgflow.cli._ui",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgflow",
        description=(
            "Durable workflows and change data capture on PostgreSQL. "
            "The database comes from --dsn or PGFLOW_DATABASE_URL."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("PGFLOW_LOG_LEVEL", "WARNING"),
        help="logging level (default: $PGFLOW_LOG_LEVEL or WARNING)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.getLevelName(str(args.log_level).upper())
    if not isinstance(level, int):
        parser.error(
            f"--log-level: unknown level {args.log_level!r}"
            " (use DEBUG, INFO, WARNING, ERROR or CRITICAL)"
        )
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        with pooler_env(getattr(args, "pooler", None)):
            return int(args.func(args) or 0)
    except PgflowError as exc:
        print(f"pgflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
