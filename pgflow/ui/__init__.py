"""``pgflow ui``: a web console for runs, consumers and dead letters.

An ASGI application (Starlette, server-rendered Jinja2 templates, a vendored htmx for
auto-refresh; nothing from a CDN, so it works offline) that reads pgflow's tables and
views and acts on runs through :mod:`pgflow.admin`::

    from pgflow.ui import app
    console = app("postgresql://...", token="s3cret")       # standalone: uvicorn
    host_app.mount("/pgflow", app(pool, auth=is_admin))       # inside FastAPI/Starlette

Pages: Runs (filters, keyset pages, per-state counts, auto-refresh), Run (record,
object, history timeline, errors, reasons, trace link), Workflows (graph drawn as SVG
with per-status counts), Consumers (lag per shard, horizon, lag chart, stuck runs), Dead
letters (list, payload, replay) and Query (``pgflow inspect`` with CSV download).

Modules: ``_queries`` (every SQL statement), ``_security`` (token / auth hook, CSRF,
headers), ``_svg`` (graph and chart drawings), ``_app`` (routes). Needs the ``ui`` extra:
``pip install 'pgflow-engine[ui]'``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

try:
    from starlette.applications import Starlette
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("pgflow.ui needs the 'ui' extra: pip install 'pgflow-engine[ui]'") from exc

from ._security import AuthHook

__all__ = ["AuthHook", "app"]


def app(
    dsn_or_pool: str | AsyncConnectionPool[AsyncConnection[Any]] | None = None,
    *,
    workflows: Iterable[Any] = (),
    token: str | None = None,
    auth: AuthHook | None = None,
    read_only: bool = False,
    trace_url: str | None = None,
    page_size: int = 50,
    pool_size: int = 4,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The console as an ASGI app.

    ``dsn_or_pool``: a DSN (a small pool of ``pool_size`` connections is opened on the
    first request and closed at shutdown), an open ``psycopg_pool.AsyncConnectionPool``
    (yours: you close it), or None for ``$PGFLOW_DATABASE_URL``.
    ``workflows``: Builders / Workflows / Graphs whose graphs the Workflows page draws.
    ``token``: required on every request (``Authorization: Bearer`` or the cookie set by
    ``?token=``). ``auth``: a hook ``request -> bool`` (or awaitable) for when the console
    is mounted in an app with its own login. ``read_only``: no actions.
    ``trace_url``: link template for traces, e.g. ``http://jaeger:16686/trace/{trace_id}``.
    ``allowed_hosts``: ``Host`` header values to accept (Starlette's TrustedHostMiddleware;
    ``pgflow ui`` without a token allows only loopback names, against DNS rebinding).
    A DSN's pool runs with ``jit = off``; do the same for a pool you pass (the console's
    queries are short index walks that JIT compilation slows down).
    """
    from ._app import create_app

    return create_app(
        dsn_or_pool,
        workflows=workflows,
        token=token,
        auth=auth,
        read_only=read_only,
        trace_url=trace_url,
        page_size=page_size,
        pool_size=pool_size,
        allowed_hosts=allowed_hosts,
    )
