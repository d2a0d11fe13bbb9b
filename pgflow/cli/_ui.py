"""``pgflow ui``: serve the web console (:func:`pgflow.ui.app`) with uvicorn.

Loopback by default. Any other address is refused unless a token is set (``--token`` or
``PGFLOW_UI_TOKEN``): the console shows payloads and can pause or cancel runs, so it is
never open to a network by accident. Without a token only loopback ``Host`` names are
answered (DNS rebinding). The database is checked before binding, so a bad
DSN or a missing schema is a one-line error, not a stack trace on the first request.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
from typing import Any

from pgflow.cli._common import add_command, load_target, resolve_workflow, with_connection
from pgflow.errors import ConfigError

DEFAULT_PORT = 8100
#: Host headers accepted without a token: a page elsewhere whose DNS name rebinds to
#: 127.0.0.1 sends its own name and is refused (with a token it has no cookie anyway)
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "ui",
        "web console for runs, consumers and dead letters",
        "Serve the pgflow web console with uvicorn. Binds 127.0.0.1 unless --host says "
        "otherwise; a non-loopback host needs --token (or $PGFLOW_UI_TOKEN). Open "
        "http://HOST:PORT/?token=TOKEN once to log the browser in.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("PGFLOW_UI_TOKEN") or None,
        help="require this token on every request (default: $PGFLOW_UI_TOKEN)",
    )
    parser.add_argument("--read-only", action="store_true", help="no actions, pages only")
    parser.add_argument(
        "--trace-url",
        default=os.environ.get("PGFLOW_UI_TRACE_URL") or None,
        help="link for a run's trace, e.g. 'http://jaeger:16686/trace/{trace_id}' "
        "(default: $PGFLOW_UI_TRACE_URL)",
    )
    parser.add_argument(
        "--workflow",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="a Builder/Workflow whose graph the Workflows page draws (repeatable)",
    )
    parser.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"refusing to serve the console on {host} without a token: "
            "pass --token (or set PGFLOW_UI_TOKEN), or bind 127.0.0.1"
        )


async def _check_database(dsn: str | None) -> None:
    async def probe(conn: Any) -> None:
        await conn.execute("SELECT 1 FROM pgflow.records LIMIT 1")

    await with_connection(dsn, probe)


def run(args: argparse.Namespace) -> int:
    check_bind(args.host, args.token)
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, not {args.port}")
    if args.trace_url and "{trace_id}" not in args.trace_url:
        raise ConfigError("--trace-url must contain {trace_id}")
    try:
        import uvicorn

        from pgflow.ui import app
    except ImportError:
        raise ConfigError(
            "pgflow ui needs the 'ui' extra: pip install 'pgflow-engine[ui]'"
        ) from None
    asyncio.run(_check_database(args.dsn))
    graphs = [resolve_workflow(load_target(spec), None) for spec in args.workflow]
    console = app(
        args.dsn,
        workflows=graphs,
        token=args.token,
        read_only=args.read_only,
        trace_url=args.trace_url,
        allowed_hosts=None if args.token else LOOPBACK_NAMES,
    )
    uvicorn.run(console, host=args.host, port=args.port, log_level="warning", proxy_headers=False)
    return 0
