"""``pgflow ui``: a web console for runs, consumers and dead letters.

An ASGI application (Starlette, server-rendered Jinja2 templates, a vendored htmx for
auto-refresh; nothing from a CDN, so it works offline) that reads pgflow's tables and
views and acts on runs through :mod:`pgflow.workflow.actions`::

    from pgflow.ui import app
    console = app("postgresql://...", token="s3cret")       # standalone: uvicorn
    host_app.mount("/pgflow", app(pool, auth=is_admin))       # inside FastAPI/Starlette

Pages: Runs (filters, keyset pages, per-state counts, auto-refresh), Run (record,
object, history timeline, errors, reasons, trace link), Workflows (graph drawn as SVG
with per-status counts), Consumers (lag per shard, horizon, lag chart, stuck runs), Dead
letters (list, payload, replay) and Query (``pgflow inspect`` with CSV download).

Modules: ``_queries`` (every SQL statement, under one name: ``_paging``, ``_run_queries``,
``_lag_queries``; dead letters through :mod:`pgflow.ops.dead_letters`), ``_security``
(token / auth hook, CSRF, headers), ``_svg`` (graph and chart drawings), ``_console``
(connections, templates, form check), ``_run_pages`` / ``_ops_pages`` (the pages) and
``_app`` (routes). Needs the ``ui`` extra: ``pip install 'pgflow-engine[ui]'``.
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("pgflow.ui needs the 'ui' extra: pip install 'pgflow-engine[ui]'") from exc

from pgflow.ui._app import app
from pgflow.ui._security import AuthHook

__all__ = ["AuthHook", "app"]
