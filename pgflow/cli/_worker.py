"""``pgflow worker module:attr``: run a workflow's consumers until Ctrl-C / SIGTERM.

``attr`` names a :class:`pgflow.Builder` (built here with ``--dsn``), a
:class:`pgflow.Workflow`, or a zero-argument factory returning either. On SIGINT or
SIGTERM the worker stops taking new batches, lets the batches in flight commit or roll
back, and exits 0. Start as many workers as you like, on as many machines: shards are
shared between them and a dead worker's shards move to the others.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from typing import Any

from ..builder import Builder
from ..errors import ConfigError
from ..workflow import Workflow

logger = logging.getLogger("pgflow.worker")


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
    """A Workflow or Builder from ``target`` (calling a zero-argument factory once)."""
    if not isinstance(target, Builder | Workflow) and callable(target):
        target = target()
    if isinstance(target, Builder | Workflow):
        return target
    raise ConfigError(f"{target!r} is not a pgflow.Builder, a pgflow.Workflow, or a factory of one")


def build_workflow(
    spec: str, dsn: str | None, pool_size: int | None = None, listen_dsn: str | None = None
) -> Workflow[Any, Any]:
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


def _pool_size_default() -> int | None:
    raw = os.environ.get("PGFLOW_POOL_SIZE")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"PGFLOW_POOL_SIZE must be a whole number, not {raw!r}") from None


def register(subparsers: Any) -> None:
    from . import add_dsn_argument

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker",
        help="run a workflow's steps, timeouts and connectors",
        description=(
            "Run the consumers of MODULE:ATTR (a pgflow.Builder, a pgflow.Workflow, or a "
            "zero-argument factory of one) until Ctrl-C or SIGTERM; the batches in "
            "flight finish before it exits."
        ),
    )
    parser.add_argument(
        "targets",
        metavar="MODULE:ATTR",
        nargs="+",
        help="one or more workflows; one process runs them all on one LISTEN connection",
    )
    add_dsn_argument(parser)
    parser.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="connections in the worker's pool (default: $PGFLOW_POOL_SIZE, else the "
        "workflow's own, 10); the worker also holds one LISTEN connection",
    )
    parser.add_argument(
        "--listen-dsn",
        default=None,
        help="a direct (or session-pooled) connection string for the LISTEN connection "
        "when --dsn goes through a transaction pooler (default: $PGFLOW_LISTEN_DSN; "
        "without one the worker polls)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pool_size = args.pool_size if args.pool_size is not None else _pool_size_default()
    workflows = [
        build_workflow(target, args.dsn, pool_size, args.listen_dsn) for target in args.targets
    ]
    asyncio.run(serve(*workflows))
    return 0


async def serve(*workflows: Workflow[Any, Any], stop: asyncio.Event | None = None) -> None:
    """Run ``workflows`` until ``stop`` is set or SIGINT/SIGTERM arrives, then stop them
    cleanly (batches in flight commit or roll back)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    names = ", ".join(wf.name for wf in workflows)
    try:
        for wf in workflows:
            await wf.run()
        print(f"pgflow worker: {names} running (Ctrl-C to stop)", flush=True)
        await stop.wait()
        print(f"pgflow worker: {names} stopping", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for wf in workflows:
            await wf.stop()
