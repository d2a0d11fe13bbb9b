"""The console's pages and actions (Starlette routes over :mod:`._queries`).

Server-rendered Jinja2 templates; htmx (vendored, ``static/``) only re-fetches a page
and swaps its live part for auto-refresh. Actions are HTML forms that POST, check the
CSRF token, call :mod:`pgflow.workflow.actions` / the dead-letter replay through ``_queries`` and
redirect back (303) to the page, which then shows the new state.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from pgflow import _db
from pgflow.errors import InvalidTransition, NotFound, PgflowError
from pgflow.ops._format import format_interval
from pgflow.ops.inspect import InspectError
from pgflow.ui import _queries as q
from pgflow.ui._security import CSRF_FIELD, AuthHook, Guard, csrf_ok
from pgflow.ui._svg import graph_svg, sparkline
from pgflow.workflow.builder import Builder
from pgflow.workflow.graph import Graph

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
Pool = AsyncConnectionPool[AsyncConnection[Any]]

#: lag samples kept for the Consumers chart: one per 5 s at most, 15 minutes
LAG_SAMPLE_EVERY = 5.0
LAG_SAMPLES = 180


class _Database:
    """The console's connections: the caller's pool, or one opened lazily from a DSN
    (lazily, because a mounted sub-application never sees the host's lifespan)."""

    def __init__(self, dsn_or_pool: str | Pool | None, max_size: int) -> None:
        self._pool: Pool | None = None if isinstance(dsn_or_pool, str | None) else dsn_or_pool
        self._dsn = dsn_or_pool if isinstance(dsn_or_pool, str | None) else None
        self._owned = self._pool is None
        self._max_size = max_size
        self._lock = asyncio.Lock()
        self.runs_columns: frozenset[str] | None = None

    async def pool(self) -> Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    dsn = _db.resolve_dsn(self._dsn)
                    pool: Pool = AsyncConnectionPool(
                        dsn,
                        min_size=1,
                        max_size=self._max_size,
                        kwargs={**_db.connect_kwargs(dsn), "autocommit": True},
                        open=False,
                        name="pgflow-ui",
                        configure=_configure,
                    )
                    await pool.open(wait=True, timeout=30)
                    self._pool = pool
        return self._pool

    @asynccontextmanager
    async def conn(self) -> AsyncIterator[AsyncConnection[Any]]:
        async with (await self.pool()).connection() as conn:
            if self.runs_columns is None:
                self.runs_columns = await q.view_columns(conn, "runs")
            yield conn

    async def close(self) -> None:
        if self._owned and self._pool is not None:
            await self._pool.close()
            self._pool = None


async def _configure(conn: AsyncConnection[Any]) -> None:
    """The console's queries are short index walks; JIT compiling them costs more than
    running them (measured 4 ms -> 30-185 ms), so its own connections turn JIT off."""
    await conn.execute("SET jit = off")


class _LagHistory:
    """Recent lag samples per consumer, taken when the Consumers page is served (it
    refreshes itself every few seconds while open); kept in memory only."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, dict[str, tuple[int, float]]]] = deque(maxlen=LAG_SAMPLES)

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        now = time.monotonic()
        if self.samples and now - self.samples[-1][0] < LAG_SAMPLE_EVERY:
            return
        per: dict[str, tuple[int, float]] = {}
        for r in rows:
            events, seconds = per.get(r["consumer"], (0, 0.0))
            per[r["consumer"]] = (events + r["lag_events"], max(seconds, r["lag_seconds"]))
        self.samples.append((now, per))

    def series(self, consumer: str, index: int) -> list[float]:
        return [float(s[1].get(consumer, (0, 0.0))[index]) for s in self.samples]


# ------------------------------------------------------------------- helpers
def _ts(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _dur(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, timedelta | int | float):
        return format_interval(value)
    return str(value)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def _traceback_start(error: str | None, lines: int = 12) -> str:
    if not error:
        return ""
    head = error.strip().splitlines()
    return "\n".join(head[:lines]) + ("\n…" if len(head) > lines else "")


def _parse_time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise HTTPException(400, f"not a date/time: {raw!r} (use 2026-01-31T12:00)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _graphs(items: Iterable[Any]) -> dict[str, Graph[Any]]:
    out: dict[str, Graph[Any]] = {}
    for item in items:
        graph = item.graph() if isinstance(item, Builder) else getattr(item, "graph", item)
        if not isinstance(graph, Graph):
            raise TypeError(f"not a pgflow Builder, Workflow or Graph: {item!r}")
        out[graph.workflow] = graph
    return out


# --------------------------------------------------------------------- the app
class Console:
    """State shared by the routes of one console app."""

    def __init__(
        self,
        dsn_or_pool: str | Pool | None,
        *,
        workflows: Iterable[Any] = (),
        read_only: bool = False,
        trace_url: str | None = None,
        page_size: int = 50,
        pool_size: int = 4,
    ) -> None:
        self.db = _Database(dsn_or_pool, pool_size)
        self.graphs = _graphs(workflows)
        self.read_only = read_only
        self.trace_url = trace_url
        self.page_size = page_size
        self.lag = _LagHistory()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        env = self.templates.env
        env.filters.update(ts=_ts, dur=_dur, pretty=_pretty, tbstart=_traceback_start)
        env.globals.update(read_only=read_only, states=q.RUN_STATES, csrf_field=CSRF_FIELD)

    def render(self, request: Request, name: str, status_code: int = 200, **ctx: Any) -> Response:
        ctx.setdefault("page", name.removesuffix(".html"))
        ctx["csrf"] = request.state.csrf
        return self.templates.TemplateResponse(request, name, ctx, status_code=status_code)

    def trace_link(self, trace_id: str | None) -> str | None:
        if not trace_id or not self.trace_url:
            return None
        return self.trace_url.replace("{trace_id}", trace_id)

    # ------------------------------------------------------------------ pages
    async def runs_page(self, request: Request) -> Response:
        p = request.query_params
        state = (p.get("run_state") or "").upper() or None
        if state and state not in q.RUN_STATES:
            raise HTTPException(400, f"unknown run state {state!r}")
        flt = q.RunFilter(
            workflow=p.get("workflow") or None,
            status=p.get("status") or None,
            run_state=state,
            foreign_id_prefix=p.get("foreign_id") or None,
            created_after=_parse_time(p.get("created_after")),
            created_before=_parse_time(p.get("created_before")),
        )
        after = p.get("after") or None
        async with self.db.conn() as conn:
            reason_col = "run_state_reason" in (self.db.runs_columns or ())
            try:
                page = await q.runs(
                    conn, flt, limit=self.page_size, after=after, reason_column=reason_col
                )
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
            names = await q.workflows(conn)
            state_counts = await q.run_state_counts(conn, flt.workflow)
            status_names = await q.statuses(conn, flt.workflow) if flt.workflow else []
            status_counts = (
                await q.status_counts(conn, flt.workflow, status_names) if flt.workflow else {}
            )
        next_url = None
        if page.next_token:
            rest = [(k, v) for k, v in p.multi_items() if k != "after"]
            next_url = request.url.include_query_params(**dict(rest), after=page.next_token)
        return self.render(
            request,
            "runs.html",
            page_rows=page.rows,
            next_url=next_url,
            flt=flt,
            workflow_names=names,
            state_counts=state_counts,
            status_counts=status_counts,
            reason_col=reason_col,
            refresh=p.get("refresh") != "off" and not after,
            query=p,
        )

    async def run_page(self, request: Request) -> Response:
        run_id = _uuid(request.path_params["run_id"])
        async with self.db.conn() as conn:
            rec = await q.run(conn, run_id)
            if rec is None:
                raise HTTPException(404, f"no run {run_id}")
            history = await q.run_history(conn, rec)
        return self.render(
            request,
            "run.html",
            rec=rec,
            history=history,
            erased=rec["run_state"] in ("DATA_DELETED", "REQUESTED_DATA_DELETED")
            or rec["object"] is None,
            trace=self.trace_link(rec.get("trace_id")),
            trace_link=self.trace_link,
            done=_DONE.get(request.query_params.get("done") or ""),
            reason=_current_reason(rec, history),
            actions=_actions_for(rec["run_state"]),
        )

    async def workflows_page(self, request: Request) -> Response:
        views = []
        async with self.db.conn() as conn:
            names = sorted(set(await q.workflows(conn)) | set(self.graphs))
            for name in names:
                graph = self.graphs.get(name)
                statuses = (
                    [s.name for s in graph.used_statuses()]
                    if graph
                    else await q.statuses(conn, name)
                )
                counts = await q.status_counts(conn, name, statuses, active_only=graph is not None)
                svg = None
                if graph is not None:
                    runs_url = request.url_for("runs").include_query_params(workflow=name)
                    link = f"{runs_url}&status={{status}}"
                    svg = graph_svg(graph, {k: f"{v} active" for k, v in counts.items()}, link)
                views.append({"name": name, "graph": graph, "svg": svg, "counts": counts})
        return self.render(request, "workflows.html", workflows=views)

    async def consumers_page(self, request: Request) -> Response:
        async with self.db.conn() as conn:
            lag = await q.consumer_lag(conn)
            hz = await q.horizon(conn)
            stuck = await q.stuck_runs(conn)
        self.lag.add(lag)
        consumers = sorted({r["consumer"] for r in lag})
        charts = {}
        for c in consumers:
            events, seconds = self.lag.series(c, 0), self.lag.series(c, 1)
            charts[c] = {
                "events": sparkline(events),
                "seconds": sparkline(seconds),
                "events_now": f"{int(events[-1]):,}" if events else "",
                "seconds_now": _dur(seconds[-1]) if seconds else "",
            }
        return self.render(
            request, "consumers.html", lag=lag, horizon=hz, stuck=stuck, charts=charts,
            consumers=consumers,
        )  # fmt: skip

    async def dead_letters_page(self, request: Request) -> Response:
        p = request.query_params
        show_all = p.get("all") == "1"
        async with self.db.conn() as conn:
            try:
                page = await q.dead_letters(
                    conn,
                    pending_only=not show_all,
                    consumer=p.get("consumer") or None,
                    limit=self.page_size,
                    after=p.get("after") or None,
                )
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
        next_url = None
        if page.next_token:
            rest = {k: v for k, v in p.items() if k != "after"}
            next_url = request.url.include_query_params(**rest, after=page.next_token)
        replayed = p.get("replayed")
        return self.render(
            request,
            "dead_letters.html",
            rows=page.rows,
            next_url=next_url,
            show_all=show_all,
            consumer=p.get("consumer") or "",
            replayed=int(replayed) if replayed and replayed.isdigit() else None,
        )

    async def query_page(self, request: Request) -> Response:
        sql = request.query_params.get("sql") or ""
        result, error = None, None
        if sql.strip():
            async with self.db.conn() as conn:
                try:
                    result = await q.query(conn, sql)
                except InspectError as exc:
                    error = str(exc)
        return self.render(
            request, "query.html", sql=sql, result=result, error=error,
            status_code=400 if error else 200,
        )  # fmt: skip

    async def query_csv(self, request: Request) -> Response:
        sql = request.query_params.get("sql") or ""
        async with self.db.conn() as conn:
            try:
                result = await q.query(conn, sql, limit=100_000)
            except InspectError as exc:
                return Response(f"{exc}\n", status_code=400, media_type="text/plain")
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(result.columns)
        for row in result.rows:
            writer.writerow([_csv_cell(v) for v in row])
        return StreamingResponse(
            iter([buf.getvalue()]),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": 'attachment; filename="pgflow-query.csv"'},
        )

    # ---------------------------------------------------------------- actions
    async def _checked_form(self, request: Request) -> Any:
        if self.read_only:
            raise HTTPException(403, "the console is read-only (--read-only)")
        form = await request.form()
        if not csrf_ok(request, form):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and retry")
        return form

    async def run_action(self, request: Request) -> Response:
        form = await self._checked_form(request)
        run_id = _uuid(request.path_params["run_id"])
        action = request.path_params["action"]
        if action not in q.ACTIONS:
            raise HTTPException(404, f"unknown action {action!r}")
        reason = (str(form.get("reason") or "")).strip()[:500] or None
        async with self.db.conn() as conn:
            try:
                result = await q.act_on_run(conn, run_id, action, reason)
            except (NotFound, InvalidTransition) as exc:
                raise HTTPException(
                    409 if isinstance(exc, InvalidTransition) else 404, str(exc)
                ) from None
        log.info("pgflow ui: %s (reason %r)", result.message, reason)
        url = request.url_for("run", run_id=str(run_id)).include_query_params(done=action)
        return RedirectResponse(str(url), status_code=303)

    async def replay_action(self, request: Request) -> Response:
        await self._checked_form(request)
        dl_id = request.path_params["dead_letter_id"]
        async with self.db.conn() as conn:
            try:
                result = await q.replay(conn, dl_id)
            except PgflowError as exc:
                code = 404 if isinstance(exc, NotFound) else 409
                raise HTTPException(code, str(exc)) from None
        log.info("pgflow ui: %s", result.message)
        url = request.url_for("dead_letters").include_query_params(replayed=dl_id)
        return RedirectResponse(str(url), status_code=303)

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


def _csv_cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _uuid(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise HTTPException(404, f"not a run id: {raw!r}") from None


_DONE = {"pause": "Paused", "resume": "Resumed", "retry": "Retried", "cancel": "Cancelled"}


def _current_reason(rec: dict[str, Any], history: list[dict[str, Any]]) -> str | None:
    """Why the run is in its run state: ``run_state_reason`` when the schema has it,
    else the reason stored with the change that put it there."""
    if rec.get("run_state_reason"):
        return str(rec["run_state_reason"])
    if history and history[-1].get("run_state") == rec["run_state"]:
        for h in reversed(history):
            if h.get("run_state") != rec["run_state"]:
                break
            if h.get("reason"):
                return str(h["reason"])
    return None


def _actions_for(run_state: str) -> list[str]:
    if run_state == "PAUSED":
        return ["resume", "retry", "cancel"]
    if run_state in ("INITIATED", "RUNNING"):
        return ["pause", "retry", "cancel"]
    return []


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
