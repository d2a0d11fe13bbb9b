"""The ``pgflow`` command line.

Each sub-command lives in its own module exposing ``register(subparsers)``; the
module list below is the whole command set. Errors pgflow raises on purpose are
printed as one line and exit with status 1; bad arguments exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection

from pgflow import _db
from pgflow.errors import PgflowError, SchemaError

T = TypeVar("T")

COMMAND_MODULES = [
    "pgflow.cli._migrate",
    "pgflow.cli._embedded",
    "pgflow.cli._inspect",
    "pgflow.cli._runs",
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


def add_dsn_argument(parser: argparse.ArgumentParser) -> None:
    """The shared ``--dsn`` option (falls back to PGFLOW_DATABASE_URL / DATABASE_URL)
    and ``--pooler`` (what sits in front of that DSN; falls back to PGFLOW_POOLER)."""
    parser.add_argument(
        "--dsn",
        default=None,
        help="PostgreSQL connection string (default: $PGFLOW_DATABASE_URL or $DATABASE_URL)",
    )
    parser.add_argument(
        "--pooler",
        choices=_db.POOLERS,
        default=None,
        help="connection pooler in front of --dsn: 'transaction' for pgbouncer "
        "transaction mode, RDS Proxy, Supavisor (default: $PGFLOW_POOLER, else none; "
        "a pgflow_pooler parameter in the DSN wins)",
    )


@contextlib.contextmanager
def _pooler_env(pooler: str | None) -> Iterator[None]:
    """``--pooler`` is ``$PGFLOW_POOLER`` for this command: every connection it opens
    (and any worker process it starts) resolves the pooler from there."""
    if pooler is None:
        yield
        return
    saved = os.environ.get(_db.POOLER_ENV)
    os.environ[_db.POOLER_ENV] = pooler
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_db.POOLER_ENV, None)
        else:
            os.environ[_db.POOLER_ENV] = saved


async def with_connection(
    dsn: str | None, work: Callable[[AsyncConnection[Any]], Awaitable[T]]
) -> T:
    """Run ``work`` on one autocommit connection to ``dsn`` (or $PGFLOW_DATABASE_URL),
    turning a missing pgflow schema into a one-line :class:`SchemaError`."""
    conn = await _db.connect(_db.resolve_dsn(dsn), autocommit=True)
    try:
        return await work(conn)
    except psycopg.errors.UndefinedTable as exc:
        raise SchemaError(
            f"{_db.first_line(exc)}: is the pgflow schema installed? run `pgflow migrate`"
        ) from None
    finally:
        await conn.close()


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
        with _pooler_env(getattr(args, "pooler", None)):
            return int(args.func(args) or 0)
    except PgflowError as exc:
        print(f"pgflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
