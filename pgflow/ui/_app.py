"""The console's Starlette app: its routes, middleware and error page.

Server-rendered Jinja2 templates; htmx (vendored, ``static/``) only re-fetches a page
and swaps its live part for auto-refresh. Actions are HTML forms that POST, check the
CSRF token (:mod:`._security`), call :mod:`pgflow.workflow.actions` /
:mod:`pgflow.ops.dead_letters` through ``_queries`` and redirect back (303) to the page,
which then shows the new state.

The pages live by subject: :mod:`._run_pages` (runs, a run, workflows, run actions) and
:mod:`._ops_pages` (consumers, dead letters, query); what they share (connections,
templates, the form check) in :mod:`._console`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pgflow import _db
from pgflow.ui._console import HERE, Pool
from pgflow.ui._ops_pages import OpsPages
from pgflow.ui._run_pages import RunPages
from pgflow.ui._security import AuthHook, Guard

log = logging.getLogger(__name__)


class Console(RunPages, OpsPages):
    """One console app's pages (and its state, :class:`._console.ConsoleBase`)."""

    async def error_page(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            code, message = exc.status_code, str(exc.detail)
        else:  # a database error: one line, logged; the console keeps serving
            log.warning("pgflow ui: %s %s: %s", request.method, request.url.path, exc)
            code, message = 503, f"database error: {_db.first_line(exc)}"
            if isinstance(exc, psycopg.errors.UndefinedTable):
                message += " (is the pgflow schema installed? run `pgflow migrate`)"
        if not hasattr(request.state, "csrf"):
            return Response(f"{message}\n", status_code=code)
        return self.render(request, "error.html", status_code=code, message=message, code=code)


def app(
    dsn_or_pool: str | Pool | None = None,
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
    console = Console(
        dsn_or_pool,
        workflows=workflows,
        read_only=read_only,
        trace_url=trace_url,
        page_size=page_size,
        pool_size=pool_size,
    )

    async def root(request: Request) -> Response:
        return RedirectResponse(str(request.url_for("runs")), status_code=303)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await console.db.close()

    routes = [
        Route("/", root),
        Route("/runs", console.runs_page, name="runs"),
        Route("/runs/{run_id}", console.run_page, name="run"),
        Route("/runs/{run_id}/{action}", console.run_action, methods=["POST"], name="run_action"),
        Route("/workflows", console.workflows_page, name="workflows"),
        Route("/consumers", console.consumers_page, name="consumers"),
        Route("/dead-letters", console.dead_letters_page, name="dead_letters"),
        Route(
            "/dead-letters/{dead_letter_id:int}/replay",
            console.replay_action,
            methods=["POST"],
            name="replay",
        ),
        Route("/query", console.query_page, name="query"),
        Route("/query.csv", console.query_csv, name="query_csv"),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    starlette_app = Starlette(
        routes=routes,
        middleware=[
            # Host check first: against DNS rebinding (a page on evil.example whose name
            # resolves to 127.0.0.1 would otherwise be same-origin with the console)
            Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or ["*"])),
            Middleware(Guard, token=token, auth=auth),
        ],
        exception_handlers={HTTPException: console.error_page, psycopg.Error: console.error_page},
        lifespan=lifespan,
    )
    starlette_app.state.console = console
    return starlette_app
