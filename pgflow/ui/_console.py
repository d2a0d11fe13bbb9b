"""What every page of the console shares: its connections, templates and form checks.

:class:`ConsoleBase` holds one console app's state (the database, the workflows whose
graphs it draws, the Jinja2 templates and their filters); the pages are its subclasses'
methods (:mod:`._run_pages`, :mod:`._ops_pages`), put together in :mod:`._app`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from pgflow import _db
from pgflow.errors import NotFound, PgflowError
from pgflow.ops._format import format_interval
from pgflow.ui import _queries as q
from pgflow.ui._security import CSRF_FIELD, csrf_ok
from pgflow.workflow.builder import Builder
from pgflow.workflow.graph import Graph

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


class LagHistory:
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


# ----------------------------------------------------------- template filters
def _ts(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def dur(value: Any) -> str:
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


# -------------------------------------------------------------- request parts
def parse_time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise HTTPException(400, f"not a date/time: {raw!r} (use 2026-01-31T12:00)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_uuid(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise HTTPException(404, f"not a run id: {raw!r}") from None


def next_page_url(request: Request, token: str | None) -> URL | None:
    """This page's address with its filters and ``after=token`` (None on the last page)."""
    if not token:
        return None
    rest = {k: v for k, v in request.query_params.items() if k != "after"}
    return request.url.include_query_params(**rest, after=token)


@contextmanager
def http_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Errors of ``kinds`` as HTTP errors with their one-line message: a bad page token
    (ValueError) 400, :class:`NotFound` 404, any other pgflow error 409 (the run or
    dead letter is not in a state that allows it)."""
    try:
        yield
    except kinds as exc:
        if isinstance(exc, ValueError):
            code = 400
        elif isinstance(exc, NotFound):
            code = 404
        elif isinstance(exc, PgflowError):
            code = 409
        else:
            raise
        raise HTTPException(code, str(exc)) from None


def _graphs(items: Iterable[Any]) -> dict[str, Graph[Any]]:
    out: dict[str, Graph[Any]] = {}
    for item in items:
        graph = item.graph() if isinstance(item, Builder) else getattr(item, "graph", item)
        if not isinstance(graph, Graph):
            raise TypeError(f"not a pgflow Builder, Workflow or Graph: {item!r}")
        out[graph.workflow] = graph
    return out


# --------------------------------------------------------------------- the base
class ConsoleBase:
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
        self.lag = LagHistory()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        env = self.templates.env
        env.filters.update(ts=_ts, dur=dur, pretty=_pretty, tbstart=_traceback_start)
        env.globals.update(read_only=read_only, states=q.RUN_STATES, csrf_field=CSRF_FIELD)

    def render(self, request: Request, name: str, status_code: int = 200, **ctx: Any) -> Response:
        ctx.setdefault("page", name.removesuffix(".html"))
        ctx["csrf"] = request.state.csrf
        return self.templates.TemplateResponse(request, name, ctx, status_code=status_code)

    def trace_link(self, trace_id: str | None) -> str | None:
        if not trace_id or not self.trace_url:
            return None
        return self.trace_url.replace("{trace_id}", trace_id)

    async def checked_form(self, request: Request) -> Any:
        """The form of an action's POST, once the console allows actions and the form's
        CSRF token matches the browser's cookie (:mod:`._security`)."""
        if self.read_only:
            raise HTTPException(403, "the console is read-only (--read-only)")
        form = await request.form()
        if not csrf_ok(request, form):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and retry")
        return form
