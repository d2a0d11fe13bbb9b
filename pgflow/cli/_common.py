"""What the command modules share: declaring a command, connecting, loading workflows.

* :func:`add_command` declares a sub-command with its help and the shared ``--dsn`` /
  ``--pooler`` options, so every
  command that talks to the database takes them the same way.
* :func:`with_connection` / :func:`connected` run a command on one autocommit
  connection and turn a missing schema into a one-line error.
* :func:`load_target`, :func:`resolve_workflow` and :func:`build_workflow` turn a
  ``MODULE:ATTR`` argument into a workflow (``worker``, ``graph``, ``ui``,
  ``dead-letters --target``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import importlib
import inspect
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection

from pgflow import _db
from pgflow.errors import ConfigError, SchemaError
from pgflow.workflow.builder import Builder
from pgflow.workflow.workflow import Workflow

T = TypeVar("T")

__all__ = [
    "add_command",
    "add_dsn_argument",
    "build_workflow",
    "connected",
    "fetch",
    "load_target",
    "pooler_env",
    "resolve_workflow",
    "with_connection",
]


# ----------------------------------------------------------------------- arguments
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


def add_command(
    subparsers: Any,
    name: str,
    help: str,
    description: str,
    *,
    dsn: bool = True,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """Declare sub-command ``name``: ``help`` is its line in ``pgflow --help``,
    ``description`` the text of ``pgflow NAME --help``; ``dsn``: it takes ``--dsn`` /
    ``--pooler``. (A command that prints rows adds ``--json`` / ``--csv`` last, with
    :func:`pgflow.cli._render.add_format_arguments`, so they close its usage line.)"""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help, description=description, epilog=epilog
    )
    if dsn:
        add_dsn_argument(parser)
    return parser


# -------------------------------------------------------------------- connections
@contextlib.contextmanager
def pooler_env(pooler: str | None) -> Iterator[None]:
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


Handler = Callable[[AsyncConnection[Any], argparse.Namespace], Awaitable[int]]


def connected(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """A command's ``func``: ``handler(conn, args)`` on a connection to ``--dsn``
    (a ``--limit`` it has must be positive)."""

    def run(args: argparse.Namespace) -> int:
        limit = getattr(args, "limit", 1)
        if limit is not None and limit < 1:
            raise ConfigError("--limit must be positive")
        return asyncio.run(with_connection(args.dsn, lambda conn: handler(conn, args)))

    return run


async def fetch(
    conn: AsyncConnection[Any], sql: str, params: Sequence[Any] | dict[str, Any] = ()
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows (tuples) of ``sql``."""
    cur = await conn.execute(sql, params)
    rows = [tuple(r) for r in await cur.fetchall()]
    return [d.name for d in cur.description or ()], rows


# ---------------------------------------------------------------------- workflows
def load_target(spec: str) -> Any:
    """Import ``module:attr`` (the current directory is importable, like ``python -m``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected MODULE:ATTR (e.g. myapp.flows:orders), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    return target


def resolve_workflow(target: Any, dsn: str | None) -> Workflow[Any, Any] | Builder[Any, Any]:
    """A Workflow or Builder from ``target`` (calling a zero-argument factory once).

    Only a plain function is called as a factory: a class (an enum, a dataclass...) or
    any other callable is refused without calling it, as is a function that needs
    arguments — calling what the user did not mean as a factory could have effects.
    """
    if isinstance(target, Builder | Workflow):
        return target
    what = _describe(target)
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        raise ConfigError(f"{what} is not a pgflow.Builder, a pgflow.Workflow, or a factory of one")
    try:
        inspect.signature(target).bind()
    except TypeError:
        raise ConfigError(
            f"{what} needs arguments: a factory must take none"
            " (or name the pgflow.Builder/Workflow itself)"
        ) from None
    built = target()
    if isinstance(built, Builder | Workflow):
        return built
    raise ConfigError(
        f"{what} returned {_describe(built)}, not a pgflow.Builder or pgflow.Workflow"
    )


def _describe(value: Any) -> str:
    if inspect.isclass(value):
        kind = "enum" if issubclass(value, enum.Enum) else "class"
        return f"{kind} {value.__qualname__}"
    if inspect.isfunction(value) or inspect.ismethod(value):
        return f"function {value.__qualname__}()"
    return f"a {type(value).__name__} ({value!r:.60})"


def build_workflow(
    spec: str, dsn: str | None, pool_size: int | None = None, listen_dsn: str | None = None
) -> Workflow[Any, Any]:
    """The workflow ``MODULE:ATTR`` names, built (a Builder) or configured (a Workflow)
    for ``dsn``."""
    target = resolve_workflow(load_target(spec), dsn)
    if isinstance(target, Builder):
        if pool_size is None:
            return target.build(dsn, listen_dsn=listen_dsn)
        return target.build(dsn, pool_size=pool_size, listen_dsn=listen_dsn)
    if dsn is not None:
        target.engine.set_dsn(dsn)
    target.engine.configure(listen_dsn=listen_dsn)
    if pool_size is not None:
        if pool_size < 2:
            raise ConfigError("--pool-size must be at least 2")
        target.engine.pool_size = pool_size  # used when the worker opens its pool
    return target
