"""The console over HTTP (Starlette's TestClient): access, CSRF, headers, keyset pages,
capped counts, the run page's details, the Query page, and ``pgflow ui``'s bind check.
The browser-level session is in ``test_ui_browser.py``."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

import pgflow.ui
from pgflow.cli import main
from pgflow.cli._ui import check_bind
from pgflow.errors import ConfigError
from pgflow.ui import _queries as q
from tests._ui import TOKEN, orders_builder, record, seed

PAGES = ["/runs", "/workflows", "/consumers", "/dead-letters", "/query", "/static/htmx.min.js"]


@pytest.fixture
def seeded(pgflow_dsn: str) -> dict[str, Any]:
    return seed(pgflow_dsn)


def _csrf(client: TestClient) -> str:
    client.get("/runs")
    value = client.cookies.get("pgflow_ui_csrf")
    assert value
    return str(value)


def _assert_security_headers(resp: Any) -> None:
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["x-content-type-options"] == "nosniff"


# ------------------------------------------------------------------- access
def test_token_required_everywhere(pgflow_dsn: str, seeded: dict[str, Any]) -> None:
    run_id = seeded["orders/order-2"]
    with TestClient(pgflow.ui.app(pgflow_dsn, token=TOKEN)) as c:
        for path in [*PAGES, f"/runs/{run_id}", "/query.csv?sql=select+1"]:
            resp = c.get(path)
            assert resp.status_code == 401, path
            _assert_security_headers(resp)
        assert c.get("/runs", headers={"authorization": "Bearer wrong"}).status_code == 401
        c.cookies.set("pgflow_ui_token", "wrong")
        assert c.get("/runs").status_code == 401
        c.cookies.delete("pgflow_ui_token")
        assert c.get(f"/runs?token={TOKEN}x", follow_redirects=False).status_code == 401
        # an action with a valid CSRF pair but no token: refused before it runs
        c.cookies.set("pgflow_ui_csrf", "c" * 40)
        resp = c.post(f"/runs/{run_id}/cancel", data={"csrf": "c" * 40})
        assert resp.status_code == 401
        ok = c.get("/runs", headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        _assert_security_headers(ok)
        # ?token= logs in: HttpOnly SameSite=Strict cookie, token dropped from the URL
        login = c.get(f"/runs?workflow=orders&token={TOKEN}", follow_redirects=False)
        assert login.status_code == 303
        assert login.headers["location"] == "/runs?workflow=orders"
        cookie = next(h for h in login.headers.get_list("set-cookie") if "token" in h)
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        for path in PAGES:
            assert c.get(path).status_code == 200, path
    assert record(pgflow_dsn, run_id)["run_state"] == "INITIATED"


def test_auth_hook_decides_when_mounted(pgflow_dsn: str, seeded: dict[str, Any]) -> None:
    async def only_admins(request: Any) -> bool:
        return request.headers.get("x-user") == "admin"

    with TestClient(pgflow.ui.app(pgflow_dsn, auth=only_admins)) as c:
        assert c.get("/runs").status_code == 401
        assert c.get("/runs", headers={"x-user": "admin"}).status_code == 200


def test_mounted_under_a_prefix(pgflow_dsn: str, seeded: dict[str, Any]) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    host = Starlette(routes=[Mount("/ops/pgflow", app=pgflow.ui.app(pgflow_dsn))])
    with TestClient(host) as c:
        page = c.get("/ops/pgflow/runs")
        assert page.status_code == 200
        assert 'href="http://testserver/ops/pgflow/static/app.css"' in page.text
        assert f"/ops/pgflow/runs/{seeded['orders/order-2']}" in page.text
        cookie = page.headers["set-cookie"]
        assert "Path=/ops/pgflow/" in cookie


# --------------------------------------------------------------------- CSRF
def test_actions_need_csrf_and_same_origin(pgflow_dsn: str, seeded: dict[str, Any]) -> None:
    run_id = seeded["orders/order-2"]
    url = f"/runs/{run_id}/pause"
    with TestClient(pgflow.ui.app(pgflow_dsn)) as c:
        csrf = _csrf(c)
        refusals = [
            c.post(url, data={"reason": "x"}),  # no token
            c.post(url, data={"reason": "x", "csrf": "f" * 43}),  # wrong token
            c.post(url, data={"csrf": csrf}, headers={"origin": "https://evil.example"}),
            c.post(url, data={"csrf": csrf}, headers={"origin": "null"}),
            c.get(url),  # not a POST
        ]
        assert [r.status_code for r in refusals] == [403, 403, 403, 403, 405]
        assert record(pgflow_dsn, run_id)["version"] == 1
        done = c.post(url, data={"csrf": csrf, "reason": "  looking  "}, follow_redirects=False)
        assert done.status_code == 303 and done.headers["location"].endswith("?done=pause")
        # the same token in a header works too (for scripts that keep the cookie)
        resumed = c.post(
            f"/runs/{run_id}/resume", headers={"x-csrf-token": csrf}, follow_redirects=False
        )
        assert resumed.status_code == 303
    rec = record(pgflow_dsn, run_id)
    assert rec["run_state"] == "RUNNING" and rec["version"] == 3
    with psycopg.connect(pgflow_dsn) as conn:
        reasons = conn.execute(
            "SELECT change, headers ->> 'reason' FROM pgflow.run_history"
            " WHERE run_id = %s ORDER BY step",
            [run_id],
        ).fetchall()
    assert reasons == [("trigger", None), ("pause", "looking"), ("resume", None)]


def test_read_only_has_no_buttons_and_refuses_actions(
    pgflow_dsn: str, seeded: dict[str, Any]
) -> None:
    run_id = seeded["orders/order-2"]
    with TestClient(pgflow.ui.app(pgflow_dsn, read_only=True)) as c:
        csrf = _csrf(c)
        page = c.get(f"/runs/{run_id}").text
        assert 'id="actions"' not in page and "read-only" in page
        assert "btn-replay" not in c.get("/dead-letters").text
        assert c.post(f"/runs/{run_id}/cancel", data={"csrf": csrf}).status_code == 403
        replay = c.post(f"/dead-letters/{seeded['dead_letter']}/replay", data={"csrf": csrf})
        assert replay.status_code == 403
    assert record(pgflow_dsn, run_id)["version"] == 1


def test_invalid_transition_is_a_clear_409(pgflow_dsn: str, seeded: dict[str, Any]) -> None:
    done = seeded["orders/order-1"]  # COMPLETED
    with TestClient(pgflow.ui.app(pgflow_dsn)) as c:
        csrf = _csrf(c)
        resp = c.post(f"/runs/{done}/pause", data={"csrf": csrf})
        assert resp.status_code == 409
        assert "cannot pause run" in resp.text and "it is COMPLETED" in resp.text
        assert c.post(f"/runs/{uuid.uuid4()}/pause", data={"csrf": csrf}).status_code == 404
        assert c.post(f"/runs/{done}/explode", data={"csrf": csrf}).status_code == 404
        # replaying twice: the second is refused, nothing happens twice
        dl = seeded["dead_letter"]
        assert c.post(f"/dead-letters/{dl}/replay", data={"csrf": csrf}).status_code == 200
        again = c.post(f"/dead-letters/{dl}/replay", data={"csrf": csrf})
        assert again.status_code == 409 and "already replayed" in again.text


# --------------------------------------------------------------- keyset pages
async def _many_runs(dsn: str, n: int, same_time: bool) -> set[uuid.UUID]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        ids = [uuid.uuid4() for _ in range(n)]
        await conn.execute(
            "INSERT INTO pgflow.records (run_id, workflow, foreign_id, status, run_state,"
            " created_at) SELECT id, 'bulk', 'bulk-' || i, 'A', 'COMPLETED',"
            " CASE WHEN %s THEN '2026-01-01'::timestamptz"
            "      ELSE '2026-01-01'::timestamptz + i * interval '1 second' END"
            " FROM unnest(%s::uuid[]) WITH ORDINALITY AS t(id, i)",
            [same_time, ids],
        )
        return set(ids)


@pytest.mark.parametrize("same_time", [False, True], ids=["distinct-times", "all-tied"])
def test_keyset_pages_return_every_run_once(pgflow_dsn: str, same_time: bool) -> None:
    """Ties on created_at are where naive keyset pagination loses or repeats rows."""
    expected = asyncio.run(_many_runs(pgflow_dsn, 123, same_time))
    seen: list[str] = []
    with TestClient(pgflow.ui.app(pgflow_dsn, page_size=10)) as c:
        url: str | None = "/runs?workflow=bulk&refresh=off"
        pages = 0
        while url:
            html = c.get(url).text
            seen += re.findall(r'href="http://testserver/runs/([0-9a-f-]{36})" class="fid"', html)
            m = re.search(r'<a href="([^"]+)" id="next-page">', html)
            url = m.group(1).replace("&amp;", "&") if m else None
            pages += 1
        assert pages == 13
    assert len(seen) == len(set(seen)) == 123
    assert {uuid.UUID(s) for s in seen} == expected


def test_bad_page_token_and_filters_are_400(pgflow_dsn: str) -> None:
    with TestClient(pgflow.ui.app(pgflow_dsn)) as c:
        assert c.get("/runs?after=garbage").status_code == 400
        assert c.get("/runs?run_state=SLEEPING").status_code == 400
        assert c.get("/runs?created_after=yesterday").status_code == 400
        assert c.get("/dead-letters?after=WyJ4Il0").status_code == 400  # ["x"]
        assert c.get("/runs/not-a-uuid").status_code == 404


async def _capped(dsn: str) -> tuple[dict[str, Any], dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        states = await q.run_state_counts(conn, "bulk", cap=100)
        statuses = await q.status_counts(conn, "bulk", ["A", "B"], cap=100)
        return states, statuses


def test_counts_are_capped_not_whole_table(pgflow_dsn: str) -> None:
    asyncio.run(_many_runs(pgflow_dsn, 123, False))
    states, statuses = asyncio.run(_capped(pgflow_dsn))
    assert str(states["COMPLETED"]) == "100+" and not states["COMPLETED"].exact
    assert str(states["PAUSED"]) == "0" and states["PAUSED"].exact
    assert str(statuses["A"]) == "100+" and str(statuses["B"]) == "0"


# ------------------------------------------------------------------ run page
def test_run_page_shows_error_trace_link_and_erasure(
    pgflow_dsn: str, seeded: dict[str, Any]
) -> None:
    app = pgflow.ui.app(pgflow_dsn, trace_url="http://jaeger:16686/trace/{trace_id}")
    with TestClient(app) as c:
        failing = c.get(f"/runs/{seeded['orders/order-2']}").text
        assert "ValueError: card declined" in failing and 'id="last-error"' in failing
        traced = c.get(f"/runs/{seeded['orders/order-1']}").text
        assert f'href="http://jaeger:16686/trace/{1:032x}"' in traced
        assert traced.count("<tr>") >= 3 + 8  # three transitions + record rows
        with psycopg.connect(pgflow_dsn) as conn:
            conn.execute(
                "UPDATE pgflow.records SET object = NULL, run_state = 'DATA_DELETED'"
                " WHERE run_id = %s",
                [seeded["orders/order-1"]],
            )
        erased = c.get(f"/runs/{seeded['orders/order-1']}").text
        assert 'id="object-erased"' in erased and '"amount"' not in erased


def test_escapes_what_it_shows(pgflow_dsn: str) -> None:
    """Foreign ids, objects and errors are user data: never markup."""
    evil = "<script>alert(1)</script>"

    async def go() -> uuid.UUID:
        from pgflow.workflow.records import insert_run

        async with await psycopg.AsyncConnection.connect(pgflow_dsn, autocommit=True) as conn:
            rid = uuid.uuid4()
            await insert_run(
                conn, workflow="w", foreign_id=evil, run_id=rid, status=evil,
                object_json='{"x": "</pre><script>alert(2)</script>"}',
            )  # fmt: skip
            return rid

    rid = asyncio.run(go())
    with TestClient(pgflow.ui.app(pgflow_dsn)) as c:
        for path in ["/runs", f"/runs/{rid}", "/workflows"]:
            html = c.get(path).text
            assert "<script>alert" not in html, path
            assert "&lt;script&gt;alert" in html, path


# --------------------------------------------------------------------- query
def test_query_page_uses_inspect_and_csv(pgflow_dsn: str, seeded: dict[str, Any]) -> None:
    with TestClient(pgflow.ui.app(pgflow_dsn)) as c:
        ok = c.get(
            "/query", params={"sql": "SELECT foreign_id FROM runs WHERE workflow = 'refunds'"}
        )
        assert ok.status_code == 200 and "order-1" in ok.text
        for bad, why in [
            ("DELETE FROM pgflow.records", "only read-only SELECT"),
            ("SELECT pg_sleep(10)", "pg_sleep() is not allowed"),
            ("SELECT * FROM pg_catalog.pg_authid", "only relations in schema pgflow"),
            ("SELECT 1; SELECT 2", "exactly one statement"),
        ]:
            resp = c.get("/query", params={"sql": bad})
            assert resp.status_code == 400 and why in resp.text, bad
        csv = c.get(
            "/query.csv",
            params={"sql": "SELECT workflow, count(*) AS n FROM runs GROUP BY 1 ORDER BY 1"},
        )
        assert csv.headers["content-type"].startswith("text/csv")
        assert "attachment" in csv.headers["content-disposition"]
        assert csv.text.splitlines() == ["workflow,n", "orders,6", "refunds,1"]
        assert c.get("/query.csv", params={"sql": "DROP TABLE x"}).status_code == 400
    assert record(pgflow_dsn, seeded["orders/order-2"])["version"] == 1


def test_workflows_page_draws_registered_graphs(pgflow_dsn: str, seeded: dict[str, Any]) -> None:
    with TestClient(pgflow.ui.app(pgflow_dsn, workflows=[orders_builder()])) as c:
        html = c.get("/workflows").text
    assert html.count("<svg") == 1  # orders drawn; refunds has no graph: a table
    assert 'data-status="REJECTED"' in html and "charge" in html
    assert "Graph unknown to this console" in html


def test_missing_schema_is_one_line(pgflow_server: Any) -> None:
    dsn = pgflow_server.dsn_for("postgres")
    with TestClient(pgflow.ui.app(dsn)) as c:
        resp = c.get("/runs")
    assert resp.status_code == 503
    assert "run `pgflow migrate`" in resp.text


# ----------------------------------------------------------------------- CLI
def test_refuses_non_loopback_without_token(capsys: Any) -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", "t")
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.com"):
        with pytest.raises(ConfigError, match="without a token"):
            check_bind(host, None)
    assert main(["ui", "--host", "0.0.0.0", "--dsn", "postgresql:///nowhere"]) == 1
    assert "refusing to serve the console on 0.0.0.0 without a token" in capsys.readouterr().err
    assert main(["ui", "--trace-url", "http://jaeger/trace"]) == 1
    assert "{trace_id}" in capsys.readouterr().err


def test_pgflow_ui_serves_with_uvicorn(pgflow_dsn: str, seeded: dict[str, Any]) -> None:
    """`pgflow ui` end to end: a real uvicorn process on loopback, token enforced."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pgflow_cli = [sys.executable, "-c", "import sys, pgflow.cli; sys.exit(pgflow.cli.main())"]
    cmd = [*pgflow_cli, "ui", "--dsn", pgflow_dsn, "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--token", TOKEN], stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = httpx.get(f"{base}/runs", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "pgflow ui did not start"
                time.sleep(0.2)
        assert resp.status_code == 401
        ok = httpx.get(f"{base}/runs", headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and "order-3" in ok.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    bad = subprocess.run(
        [*pgflow_cli, "ui", "--dsn", "postgresql://127.0.0.1:1/x"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


async def _lag_vs_view(dsn: str) -> tuple[list[Any], list[Any], list[Any]]:
    from pgflow.log.events import NewEvent, append

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        before = await (await conn.execute("SELECT pg_current_snapshot()::text")).fetchone()
        await append(
            conn,
            [
                NewEvent(stream="orders", type=t, foreign_id=f"x-{i}", version=1)
                for i in range(60)
                for t in ("CREATED", "PAID", "SHIPPED")
            ],
        )
        after = await (await conn.execute("SELECT pg_current_snapshot()::text")).fetchone()
        assert before and after
        await conn.execute(
            "INSERT INTO pgflow.cursors (consumer, shard, shard_count, stream, types) VALUES"
            " ('all', 0, 1, 'orders', NULL), ('fresh', 0, 2, 'orders', NULL),"
            " ('fresh', 1, 2, 'orders', NULL),"
            " ('two-types', 0, 3, 'orders', ARRAY['PAID', 'SHIPPED']),"
            " ('two-types', 1, 3, 'orders', ARRAY['PAID', 'SHIPPED']),"
            " ('two-types', 2, 3, 'orders', ARRAY['PAID', 'SHIPPED']),"
            " ('none', 0, 1, 'refunds', ARRAY['NOPE'])"
        )
        # 'all' has read everything before the append, and the append's diff up to its
        # 30th event; 'two-types' everything before the append
        await conn.execute(
            "UPDATE pgflow.cursors SET snap = %s::pg_snapshot, upto = %s::pg_snapshot,"
            " after_id = (SELECT id FROM pgflow.events WHERE foreign_id = 'x-9'"
            "             AND type = 'SHIPPED') WHERE consumer = 'all'",
            [before[0], after[0]],
        )
        await conn.execute(
            "UPDATE pgflow.cursors SET snap = %s::pg_snapshot WHERE consumer = 'two-types'",
            [before[0]],
        )
        ours = await q.consumer_lag(conn, cap=50)
        exact = await q.consumer_lag(conn, cap=1000)
        cur = await conn.execute(
            "SELECT consumer, shard, lag_events, oldest_pending_at FROM pgflow.consumer_lag"
            " ORDER BY consumer, shard_count, shard"
        )
        return ours, exact, await cur.fetchall()


def test_consumer_lag_matches_the_view_up_to_the_cap(
    pgflow_dsn: str, seeded: dict[str, Any]
) -> None:
    ours, exact, view = asyncio.run(_lag_vs_view(pgflow_dsn))
    assert [(r["consumer"], r["shard"], r["lag_events"]) for r in exact] == [v[:3] for v in view]
    assert [(r["consumer"], r["shard"]) for r in ours] == [(v[0], v[1]) for v in view]
    for r, (consumer, shard, events, oldest) in zip(ours, view, strict=True):
        assert r["lag"].value == min(events, 51), (consumer, shard)
        assert r["lag"].exact == (events <= 50), (consumer, shard)
        assert r["oldest"] == oldest, (consumer, shard)  # the same oldest pending event
        assert (r["lag_seconds"] > 0) == (events > 0)
    by = {(r["consumer"], r["shard"]): r for r in ours}
    assert str(by[("none", 0)]["lag"]) == "0"
    assert str(by[("all", 0)]["lag"]) == "50+"  # 180 appended - 30 taken
    assert [v[2] for v in view if v[0] == "all"] == [150]
    assert sum(v[2] for v in view if v[0] == "two-types") == 120  # PAID + SHIPPED


def test_dns_rebinding_refused_without_token(pgflow_dsn: str, seeded: dict[str, Any]) -> None:
    from pgflow.cli._ui import LOOPBACK_NAMES

    app = pgflow.ui.app(pgflow_dsn, allowed_hosts=LOOPBACK_NAMES)
    with TestClient(app, base_url="http://127.0.0.1:8100") as c:
        assert c.get("/runs").status_code == 200
        assert c.get("/runs", headers={"host": "localhost:8100"}).status_code == 200
        rebound = c.get("/runs", headers={"host": "evil.example:8100"})
        assert rebound.status_code == 400 and "order-" not in rebound.text
        csrf = _csrf(c)
        post = c.post(
            f"/runs/{seeded['orders/order-2']}/cancel",
            data={"csrf": csrf},
            headers={"host": "evil.example:8100"},
        )
        assert post.status_code == 400
    assert record(pgflow_dsn, seeded["orders/order-2"])["version"] == 1


def test_cookies_are_secure_behind_https(pgflow_dsn: str) -> None:
    with TestClient(pgflow.ui.app(pgflow_dsn, token=TOKEN), base_url="https://ops.example") as c:
        login = c.get(f"/runs?token={TOKEN}", follow_redirects=False)
    cookies = login.headers.get_list("set-cookie")
    assert len(cookies) == 2 and all("Secure" in h and "HttpOnly" in h for h in cookies)
    with TestClient(pgflow.ui.app(pgflow_dsn, token=TOKEN)) as c:  # plain http (loopback)
        login = c.get(f"/runs?token={TOKEN}", follow_redirects=False)
    assert not any("Secure" in h for h in login.headers.get_list("set-cookie"))


def test_keyset_pages_within_a_time_window(pgflow_dsn: str) -> None:
    """The page key and created_before bound the same column: the stricter must win."""
    asyncio.run(_many_runs(pgflow_dsn, 123, False))  # created 2026-01-01 00:00:01 + i s
    seen: list[str] = []
    with TestClient(pgflow.ui.app(pgflow_dsn, page_size=10)) as c:
        url: str | None = (
            "/runs?workflow=bulk&refresh=off&created_after=2026-01-01T00:00:20"
            "&created_before=2026-01-01T00:01:30"
        )
        while url:
            html = c.get(url).text
            seen += re.findall(r'href="http://testserver/runs/([0-9a-f-]{36})" class="fid"', html)
            m = re.search(r'<a href="([^"]+)" id="next-page">', html)
            url = m.group(1).replace("&amp;", "&") if m else None
    assert len(seen) == len(set(seen)) == 90 - 20  # seconds 20..89
