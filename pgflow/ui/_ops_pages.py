"""The Consumers, Dead letters and Query pages, and replaying a dead letter."""

from __future__ import annotations

import csv
import io
import json
import logging
from datetime import date, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from pgflow.errors import PgflowError
from pgflow.ops.inspect import InspectError
from pgflow.ui import _queries as q
from pgflow.ui._console import ConsoleBase, dur, http_errors, next_page_url
from pgflow.ui._svg import sparkline

log = logging.getLogger(__name__)


class OpsPages(ConsoleBase):
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
                "seconds_now": dur(seconds[-1]) if seconds else "",
            }
        return self.render(
            request, "consumers.html", lag=lag, horizon=hz, stuck=stuck, charts=charts,
            consumers=consumers,
        )  # fmt: skip

    async def dead_letters_page(self, request: Request) -> Response:
        p = request.query_params
        show_all = p.get("all") == "1"
        async with self.db.conn() as conn:
            with http_errors(ValueError):
                page = await q.dead_letters(
                    conn,
                    pending_only=not show_all,
                    consumer=p.get("consumer") or None,
                    limit=self.page_size,
                    after=p.get("after") or None,
                )
        replayed = p.get("replayed")
        return self.render(
            request,
            "dead_letters.html",
            rows=page.rows,
            next_url=next_page_url(request, page.next_token),
            show_all=show_all,
            consumer=p.get("consumer") or "",
            replayed=int(replayed) if replayed and replayed.isdigit() else None,
        )

    async def replay_action(self, request: Request) -> Response:
        await self.checked_form(request)
        dl_id = request.path_params["dead_letter_id"]
        async with self.db.conn() as conn:
            with http_errors(PgflowError):
                result = await q.replay(conn, dl_id)
        log.info("pgflow ui: %s", result.message)
        url = request.url_for("dead_letters").include_query_params(replayed=dl_id)
        return RedirectResponse(str(url), status_code=303)

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


def _csv_cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value
