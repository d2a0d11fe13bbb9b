"""The Runs, Run and Workflows pages, and the actions on a run (pause, resume, ...)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from pgflow.errors import InvalidTransition, NotFound
from pgflow.ui import _queries as q
from pgflow.ui._console import ConsoleBase, http_errors, next_page_url, parse_time, parse_uuid
from pgflow.ui._svg import graph_svg

log = logging.getLogger(__name__)

_DONE = {"pause": "Paused", "resume": "Resumed", "retry": "Retried", "cancel": "Cancelled"}


class RunPages(ConsoleBase):
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
            created_after=parse_time(p.get("created_after")),
            created_before=parse_time(p.get("created_before")),
        )
        after = p.get("after") or None
        async with self.db.conn() as conn:
            reason_col = "run_state_reason" in (self.db.runs_columns or ())
            with http_errors(ValueError):
                page = await q.runs(
                    conn, flt, limit=self.page_size, after=after, reason_column=reason_col
                )
            names = await q.workflows(conn)
            state_counts = await q.run_state_counts(conn, flt.workflow)
            status_names = await q.statuses(conn, flt.workflow) if flt.workflow else []
            status_counts = (
                await q.status_counts(conn, flt.workflow, status_names) if flt.workflow else {}
            )
        return self.render(
            request,
            "runs.html",
            page_rows=page.rows,
            next_url=next_page_url(request, page.next_token),
            flt=flt,
            workflow_names=names,
            state_counts=state_counts,
            status_counts=status_counts,
            reason_col=reason_col,
            refresh=p.get("refresh") != "off" and not after,
            query=p,
        )

    async def run_page(self, request: Request) -> Response:
        run_id = parse_uuid(request.path_params["run_id"])
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

    async def run_action(self, request: Request) -> Response:
        form = await self.checked_form(request)
        run_id = parse_uuid(request.path_params["run_id"])
        action = request.path_params["action"]
        if action not in q.ACTIONS:
            raise HTTPException(404, f"unknown action {action!r}")
        reason = (str(form.get("reason") or "")).strip()[:500] or None
        async with self.db.conn() as conn:
            with http_errors(NotFound, InvalidTransition):
                result = await q.act_on_run(conn, run_id, action, reason)
        log.info("pgflow ui: %s (reason %r)", result.message, reason)
        url = request.url_for("run", run_id=str(run_id)).include_query_params(done=action)
        return RedirectResponse(str(url), status_code=303)


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
