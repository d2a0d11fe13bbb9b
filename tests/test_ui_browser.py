"""The console in a real headless Chromium (Debian ``chromium``, driven by Playwright).

One operator's session, start to finish: log in with the token, filter runs, open a
run, pause it with a reason (the page and ``pgflow.records`` both change), resume it,
watch a new run appear by auto-refresh, look at the graph and consumers, replay a dead
letter, run a query and download it as CSV; then an attacker's attempts (no token, no
CSRF token) are refused. Every page is screenshotted under the test's temp dir, and the
browser console must stay free of errors — a CSP violation (inline script, eval) would
show up there, and htmx would stop working.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgflow.ui
from tests._ui import TOKEN, new_run, orders_builder, record, seed, serve

CHROMIUM = os.environ.get("PGFLOW_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# drives a real Chromium
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    ),
]


@pytest.fixture
def browser() -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _shot(page: Any, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    keep = os.environ.get("PGFLOW_UI_SCREENSHOTS")  # e.g. to refresh the README images
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / f"{name}.png", Path(keep) / f"{name}.png")


def test_operator_session_in_chromium(pgflow_dsn: str, browser: Any, tmp_path: Path) -> None:
    ids = seed(pgflow_dsn)
    order2 = ids["orders/order-2"]
    app = pgflow.ui.app(
        pgflow_dsn,
        workflows=[orders_builder()],
        token=TOKEN,
        trace_url="http://jaeger:16686/trace/{trace_id}",
    )
    with serve(app) as base:
        ctx = browser.new_context(viewport={"width": 1280, "height": 760}, accept_downloads=True)
        page = ctx.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        dialogs: list[str] = []

        def accept(dialog: Any) -> None:
            dialogs.append(dialog.message)
            dialog.accept()

        page.on("dialog", accept)

        # -- log in: ?token= sets the cookie and is dropped from the address bar
        resp = page.goto(f"{base}/?token={TOKEN}")
        assert resp is not None and resp.ok
        assert page.url == f"{base}/runs"
        assert "token" not in page.url
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe" not in csp
        assert resp.headers["x-frame-options"] == "DENY"
        assert page.locator("#runs-table tbody tr").count() == 7
        assert page.locator("#state-counts").inner_text().split()[:2] == ["5", "initiated"]
        _shot(page, tmp_path, "runs")

        # -- filter: paused runs of orders
        page.select_option("select[name=workflow]", "orders")
        page.select_option("select[name=run_state]", "PAUSED")
        page.click("#run-filters button[type=submit]")
        page.wait_for_url("**/runs?*run_state=PAUSED*")
        rows = page.locator("#runs-table tbody tr")
        assert rows.count() == 1 and "order-3" in rows.inner_text()
        # foreign id prefix
        page.goto(f"{base}/runs?foreign_id=order-2")
        assert page.locator("#runs-table tbody tr").count() == 1

        # -- open a run: record, error with its traceback start, history, trace link
        page.click("#runs-table a.fid")
        page.wait_for_url(f"**/runs/{order2}")
        assert page.locator("#run-state").inner_text() == "INITIATED"
        assert "ValueError: card declined" in page.locator("#last-error").inner_text()
        assert '"amount": 10' in page.locator("#object").inner_text()
        assert page.locator("#history tbody tr").count() == 1
        _shot(page, tmp_path, "run")

        # -- pause it with a reason: confirm dialog, new state on the page and in the table
        page.fill(".action-pause input[name=reason]", "card provider outage")
        page.click(".action-pause button")
        page.wait_for_url("**done=pause")
        assert dialogs and dialogs[-1].startswith("Pause run order-2?")
        assert "card provider outage" in dialogs[-1]
        assert page.locator("#run-state").inner_text() == "PAUSED"
        assert "card provider outage" in page.locator("#history").inner_text()
        assert record(pgflow_dsn, order2)["run_state"] == "PAUSED"
        _shot(page, tmp_path, "run-paused")

        # -- resume it
        page.click(".action-resume button")
        page.wait_for_url("**done=resume")
        assert page.locator("#run-state").inner_text() == "RUNNING"
        rec = record(pgflow_dsn, order2)
        assert rec["run_state"] == "RUNNING" and rec["err_count"] == 0

        # -- auto-refresh (htmx under the CSP): a new run shows up without a reload
        page.goto(f"{base}/runs")
        new_run(pgflow_dsn, "order-fresh")
        page.locator("#runs-table", has_text="order-fresh").wait_for(timeout=15_000)

        # -- workflows: the graph is drawn, with counts on the nodes
        page.goto(f"{base}/workflows")
        node = page.locator("svg.graph g[data-status=CREATED]").text_content() or ""
        assert node.split() == ["CREATED5", "active"]  # order-2, 4, 5, 6, fresh
        node = page.locator("svg.graph g[data-status=PAID]").text_content() or ""
        assert node.split() == ["PAID1", "active"]  # order-3, paused
        assert page.locator("svg.graph path.edge").count() == 3
        _shot(page, tmp_path, "workflows")

        # -- consumers: lag per shard, horizon, chart, stuck runs
        page.goto(f"{base}/consumers")
        assert page.locator("#lag tbody tr").count() == 2
        assert "order-6" in page.locator("#stuck").inner_text()
        assert page.locator("#lag-chart svg.spark").count() == 2
        _shot(page, tmp_path, "consumers")

        # -- dead letters: reason and payload, replay
        page.goto(f"{base}/dead-letters")
        row = page.locator(f"#dl-{ids['dead_letter']}")
        assert "card declined" in row.inner_text()
        row.locator("summary").click()
        assert '"card": "4242"' in row.inner_text()
        _shot(page, tmp_path, "dead-letters")
        row.locator("button.btn-replay").click()
        page.wait_for_url("**replayed=*")
        assert page.locator("#replayed").is_visible()
        with psycopg.connect(pgflow_dsn) as conn:
            got = conn.execute(
                "SELECT replayed_at IS NOT NULL FROM pgflow.dead_letters WHERE id = %s",
                [ids["dead_letter"]],
            ).fetchone()
        assert got == (True,)

        # -- query: a table, a CSV download; a write is refused by inspect's validation
        page.goto(f"{base}/query")
        page.fill("textarea[name=sql]", "SELECT foreign_id, run_state FROM runs ORDER BY 1")
        page.click("#query-form button")
        table = page.locator("#query-result")
        table.wait_for()
        assert "order-fresh" in table.inner_text()
        _shot(page, tmp_path, "query")
        with page.expect_download() as info:
            page.click("#csv-link")
        csv_text = Path(info.value.path()).read_text()
        assert csv_text.splitlines()[0] == "foreign_id,run_state"
        assert "order-2,RUNNING" in csv_text
        page.fill("textarea[name=sql]", "DELETE FROM pgflow.records")
        page.click("#query-form button")
        assert "only read-only SELECT" in page.locator("#query-error").inner_text()

        # -- an action without the CSRF token is refused, and changes nothing
        version = record(pgflow_dsn, order2)["version"]
        refused = page.request.post(
            f"{base}/runs/{order2}/cancel", form={"reason": "x"}, max_redirects=0
        )
        assert refused.status == 403
        forged = page.request.post(
            f"{base}/runs/{order2}/cancel",
            form={"reason": "x", "csrf": "forged-token-forged-token"},
            max_redirects=0,
        )
        assert forged.status == 403
        assert record(pgflow_dsn, order2)["version"] == version
        # the refused query answered 400 (expected); anything else is a real error,
        # e.g. "Refused to execute inline script because it violates ... CSP"
        assert [e for e in errors if "status of 400" not in e] == [], errors

        # -- a browser without the token sees nothing and can do nothing
        stranger = browser.new_context()
        spage = stranger.new_page()
        resp = spage.goto(f"{base}/runs")
        assert resp is not None and resp.status == 401
        assert resp.headers["x-frame-options"] == "DENY"
        assert spage.request.post(f"{base}/runs/{order2}/cancel", max_redirects=0).status == 401
        assert spage.request.get(f"{base}/static/htmx.min.js").status == 401
        stranger.close()
        assert record(pgflow_dsn, order2)["version"] == version
        ctx.close()
    for name in ("runs", "run", "run-paused", "workflows", "consumers", "dead-letters", "query"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5_000
