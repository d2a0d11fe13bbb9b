"""The webhook connector over real HTTP and real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgflow.connectors import TransactionalConsumer, webhook
from tests._util import take_batch, wait_until


async def _exchange(port: int, request: bytes, timeout: float = 10) -> tuple[int, dict[str, Any]]:
    """Send raw bytes, read the answer to the close; (status, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    assert raw, "connection dropped without an answer"
    status = int(raw.split(b" ", 2)[1])
    body = raw.split(b"\r\n\r\n", 1)[1]
    try:
        return status, json.loads(body or b"{}")
    except ValueError:
        return status, {"text": body.decode()}  # uvicorn's own plain-text 503


async def _post(
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    length: int | None = None,
) -> tuple[int, dict[str, Any]]:
    host, _, rest = url.removeprefix("http://").partition(":")
    port, _, path = rest.partition("/")
    head = f"{method} /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    return await _exchange(int(port), head.encode() + b"\r\n" + (body if length is None else b""))


def _event(i: int, **extra: Any) -> bytes:
    return json.dumps(
        {
            "id": f"evt-{i}",
            "foreign_id": f"order-{i}",
            "type": "payment.completed",
            "headers": {"amount": 12.5, "currency": "EUR"},
            **extra,
        }
    ).encode()


async def _stored(dsn: str) -> list[tuple[str, str, dict[str, str]]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT foreign_id, type, headers FROM pgflow.events WHERE stream = 'webhook:pay'"
            " ORDER BY id"
        )
        return list(await cur.fetchall())


async def test_good_post_is_durable_before_200_and_consumed_exactly_once(
    pgflow_dsn: str, pool: Any
) -> None:
    async with webhook.Connector(pgflow_dsn, "pay") as hook:
        status, body = await _post(hook.url, _event(1))
        assert status == 200 and body["id"] == "evt-1"
        # 200 means committed: another connection sees it right away.
        assert await _stored(pgflow_dsn) == [
            (
                "order-1",
                "payment.completed",
                {"amount": "12.5", "currency": "EUR", "pgflow.webhook.id": "evt-1"},
            )
        ]
        consumer = await hook.make("pay-consumer")
        assert isinstance(consumer, TransactionalConsumer)
        [ev] = await take_batch(consumer, pool, 1, limit=10)
        assert (ev.id, ev.foreign_id, ev.type) == ("evt-1", "order-1", "payment.completed")
        assert ev.headers == {"amount": "12.5", "currency": "EUR"}
        async with pool.connection() as conn, conn.transaction():
            assert await consumer.recv_batch_in(conn, 10) == []
        # No id in the body: the log position names it.
        status, body = await _post(hook.url, b'{"foreign_id": "o2", "type": "t"}')
        assert status == 200 and body["id"] == f"webhook-{body['position']}"
        ev2, ack2 = await asyncio.wait_for(consumer.recv(), 30)  # plain recv works too
        assert ev2.id == body["id"]
        await ack2()
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT lag_events FROM pgflow.consumer_lag WHERE consumer = %s",
                ("connector:webhook:pay:pay-consumer",),
            )
            assert await cur.fetchone() == (0,)


async def test_no_200_until_the_event_is_committed(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay") as hook:
        await _post(hook.url, _event(0))  # warm the pool
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as blocker:
            await blocker.execute("LOCK TABLE pgflow.events IN ACCESS EXCLUSIVE MODE")
            pending = asyncio.create_task(_post(hook.url, _event(1)))
            done, _ = await asyncio.wait({pending}, timeout=0.5)
            assert not done  # the insert is blocked, so no answer yet
            await blocker.commit()
        status, _ = await asyncio.wait_for(pending, 10)
        assert status == 200
        assert len(await _stored(pgflow_dsn)) == 2


async def test_bad_payloads_get_400_with_a_reason(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay") as hook:
        cases = {
            b"not json": "not valid JSON",
            b"[1, 2]": "JSON object",
            b'{"type": "t"}': "missing field 'foreign_id'",
            b'{"foreign_id": "o"}': "missing field 'type'",
            b'{"foreign_id": "o", "type": ""}': "non-empty",
            b'{"foreign_id": "o", "type": "t", "headers": {"a": {"b": 1}}}': "header 'a'",
            b'{"foreign_id": "o", "type": "t", "headers": [1]}': "headers",
            b'{"foreign_id": "o", "type": "t", "created_at": "yesterday"}': "ISO 8601",
        }
        for body, reason in cases.items():
            status, answer = await _post(hook.url, body)
            assert status == 400, body
            assert reason in answer["error"], (body, answer)
        assert (await _post(hook.url, _event(1), method="GET"))[0] == 405
        assert (await _post(hook.url.rstrip("/") + "/other", _event(1)))[0] == 404
        assert await _stored(pgflow_dsn) == []
        assert hook.rejected == len(cases) + 2


async def test_oversize_body_gets_413_without_being_read(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay", max_body=100) as hook:
        status, answer = await _post(hook.url, b"", length=10_000_000)
        assert status == 413 and "limit" in answer["error"]
        status, _ = await _post(hook.url, _event(1, headers={"x": "y" * 200}))
        assert status == 413
        assert await _stored(pgflow_dsn) == []


async def test_signatures_carry_a_timestamp_checked_against_the_tolerance(
    pgflow_dsn: str,
) -> None:
    async with webhook.Connector(pgflow_dsn, "pay", secret="s3cret", tolerance=60) as hook:
        body = _event(1)

        async def post(signature: str | None, payload: bytes = body) -> tuple[int, str]:
            headers = {} if signature is None else {webhook.SIGNATURE_HEADER: signature}
            status, answer = await _post(hook.url, payload, headers)
            return status, str(answer.get("error", ""))

        now = time.time()
        status, reason = await post(None)
        assert status == 401 and "missing X-Pgflow-Signature" in reason
        assert await post(webhook.sign("wrong", body)) == (401, "bad signature")
        assert (await post(webhook.sign("s3cret", body + b" ")))[1] == "bad signature"
        # a genuine signature, but captured 2 minutes ago (or dated ahead): a replay
        status, reason = await post(webhook.sign("s3cret", body, now - 120))
        assert status == 401 and "outside the 60 s tolerance" in reason
        assert (await post(webhook.sign("s3cret", body, now + 120)))[0] == 401
        # the 0.1 format has no timestamp: refused with a reason
        legacy = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        status, reason = await post(legacy)
        assert status == 401 and "no timestamp" in reason
        for malformed in ("t=abc,v1=00", "v1=00", "t=1,t=2,v1=00", "garbage", f"t={int(now)}"):
            status, reason = await post(malformed)
            assert status == 401 and reason, malformed
        # two signature headers: refused rather than guessing which one counts
        two = f"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
        sig = webhook.sign("s3cret", body)
        two += f"{webhook.SIGNATURE_HEADER}: {sig}\r\n{webhook.SIGNATURE_HEADER}: {sig}\r\n\r\n"
        assert (await _exchange(hook.port, two.encode() + body))[0] == 401
        assert await _stored(pgflow_dsn) == []
        assert (await post(webhook.sign("s3cret", body, now - 30)))[0] == 200  # inside
        assert len(await _stored(pgflow_dsn)) == 1


async def test_secret_rotation_accepts_any_listed_secret(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay", secret=["new", b"old"]) as hook:
        for i, secret in enumerate(("new", "old")):
            body = _event(i)
            sig = {webhook.SIGNATURE_HEADER: webhook.sign(secret, body)}
            assert (await _post(hook.url, body, sig))[0] == 200
        body = _event(9)  # a sender signing with both during its own rotation
        t = int(time.time())
        both = f"{webhook.sign('gone', body, t)},{webhook.sign('old', body, t).split(',')[1]}"
        assert (await _post(hook.url, body, {webhook.SIGNATURE_HEADER: both}))[0] == 200
        assert len(await _stored(pgflow_dsn)) == 3


async def test_a_seen_event_id_is_acknowledged_not_stored_twice(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay", secret="k") as hook:

        def signed(body: bytes) -> dict[str, str]:
            return {webhook.SIGNATURE_HEADER: webhook.sign("k", body)}

        status, first = await _post(hook.url, _event(1), signed(_event(1)))
        assert status == 200 and "duplicate" not in first
        # the sender retries (a fresh signature): acknowledged, same position, not stored
        status, again = await _post(hook.url, _event(1), signed(_event(1)))
        assert status == 200 and again == {**first, "duplicate": True}
        # many copies at once (one group commit, or several): one stored
        answers = await asyncio.gather(
            *(_post(hook.url, _event(2), signed(_event(2))) for _ in range(20))
        )
        assert {s for s, _ in answers} == {200}
        assert len({a["position"] for _, a in answers}) == 1
        assert sum(1 for _, a in answers if not a.get("duplicate")) == 1
        # an id-less post replayed byte for byte (same signature) is known by its signature
        idless = b'{"foreign_id": "o", "type": "t"}'
        sig = signed(idless)
        status, one = await _post(hook.url, idless, sig)
        status2, two = await _post(hook.url, idless, sig)
        assert (status, status2) == (200, 200) and two == {**one, "duplicate": True}
        assert [h.get("pgflow.webhook.id") for _, _, h in await _stored(pgflow_dsn)] == [
            "evt-1",
            "evt-2",
            None,
        ]
        assert hook.accepted == 3


async def test_two_receivers_store_a_raced_event_id_once(pgflow_dsn: str) -> None:
    """Two processes (here two connectors) behind a load balancer get the same event."""
    async with (
        webhook.Connector(pgflow_dsn, "pay") as a,
        webhook.Connector(pgflow_dsn, "pay") as b,
    ):
        for i in range(20):
            answers = await asyncio.gather(_post(a.url, _event(i)), _post(b.url, _event(i)))
            assert [s for s, _ in answers] == [200, 200]
            assert answers[0][1]["position"] == answers[1][1]["position"]
        assert len(await _stored(pgflow_dsn)) == 20


async def test_database_down_gives_503_not_200(pgflow_dsn: str) -> None:
    dead = make_conninfo(pgflow_dsn, dbname="no_such_database_here")
    async with webhook.Connector(dead, "pay") as hook:
        status, answer = await _post(hook.url, _event(1))
        assert status == 503 and "retry" in answer["error"]


async def test_keep_alive_and_concurrent_posts_group_commit(pgflow_dsn: str) -> None:
    """Three requests on one keep-alive connection, then 50 concurrent posts that must
    share transactions: the first batch is held at a table lock until all 50 posts
    wait, so whatever did not join it is one batch when it goes. At most two
    transactions store the 50 rows (``tx`` is stamped by the database; one when the
    first batch took them all). With one commit per post (``max_batch=1``): 50."""
    async with webhook.Connector(pgflow_dsn, "pay") as hook:
        host, port = hook.host, hook.port
        reader, writer = await asyncio.open_connection(host, port)
        for i in range(3):  # three requests on one connection
            body = _event(i)
            writer.write(
                f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()
        ingest = hook.app.ingest
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as blocker:
            # Every batch claims its keys in webhook_seen first: SHARE blocks that INSERT.
            await blocker.execute("LOCK TABLE pgflow.webhook_seen IN SHARE MODE")
            posts = [asyncio.create_task(_post(hook.url, _event(i))) for i in range(10, 60)]

            async def all_waiting() -> bool:
                return ingest.waiting == 50

            await wait_until(all_waiting, timeout=30, message="all 50 posts queued")
            assert not any(p.done() for p in posts)  # nothing answered while blocked
            await blocker.rollback()
        results = await asyncio.gather(*posts)
        assert {s for s, _ in results} == {200}
        assert len(await _stored(pgflow_dsn)) == 53
        assert hook.accepted == 53
        async with await psycopg.AsyncConnection.connect(pgflow_dsn) as conn:
            cur = await conn.execute(
                "SELECT count(*), count(DISTINCT tx) FROM pgflow.events"
                " WHERE stream = 'webhook:pay' AND foreign_id <> ALL(%s)",
                ([f"order-{i}" for i in range(3)],),
            )
            rows, transactions = await cur.fetchone() or (0, 0)
            assert rows == 50 and transactions <= 2, transactions


async def test_make_starts_the_server_and_the_last_close_stops_it(pgflow_dsn: str) -> None:
    hook = webhook.Connector(pgflow_dsn, "pay")
    a = await hook.make("pay-1-of-2")
    b = await hook.make("pay-2-of-2")
    assert (await _post(hook.url, _event(1)))[0] == 200
    await a.close()
    assert (await _post(hook.url, _event(2)))[0] == 200  # b still consumes
    await b.close()
    try:
        await _post(hook.url, _event(3))
    except OSError:
        pass
    else:  # pragma: no cover
        raise AssertionError("the server should be stopped")
    assert len(await _stored(pgflow_dsn)) == 2


def _raw(body: bytes, *extra_headers: str, length: bool = True) -> bytes:
    head = "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    head += "".join(f"{h}\r\n" for h in extra_headers)
    return head.encode() + b"\r\n" + body


HOSTILE = {
    "NUL in a field": rb'{"id": "n1", "foreign_id": "o\u0000", "type": "t"}',
    "NUL in a header": rb'{"id": "n2", "foreign_id": "o", "type": "t", "headers": {"a": "\u0000"}}',
    "NUL in a header name": rb'{"id": "n3", "foreign_id": "o", "type": "t",'
    rb' "headers": {"\u0000": "1"}}',
    "lone surrogate": rb'{"id": "s1", "foreign_id": "\ud800", "type": "t"}',
    "lone surrogate in a header": rb'{"id": "s2", "foreign_id": "o", "type": "t",'
    rb' "headers": {"a": "\udfff"}}',
    "deep nesting": b'{"id": "d1", "foreign_id": "o", "type": "t", "x": '
    + b"[" * 100
    + b"]" * 100
    + b"}",
    "very deep nesting": b"[" * 200_000,
    "not UTF-8": b'{"id": "u1", "foreign_id": "\xff", "type": "t"}',
    "UTF-16": '{"id": "u2", "foreign_id": "o", "type": "t"}'.encode("utf-16"),
    "reserved header": b'{"foreign_id": "o", "type": "t", "headers": {"pgflow.webhook.id": "e"}}',
    "huge integer": b'{"id": "i1", "foreign_id": "o", "type": "t", "headers": {"a": '
    + b"9" * 5000
    + b"}}",
}
REASONS = {
    "NUL in a field": "NUL",
    "NUL in a header": "NUL",
    "NUL in a header name": "NUL",
    "lone surrogate": "surrogate",
    "lone surrogate in a header": "surrogate",
    "deep nesting": "nested deeper",
    "very deep nesting": "nested deeper",
    "not UTF-8": "not UTF-8",
    "UTF-16": "not UTF-8",
    "huge integer": "not valid JSON",
    "reserved header": "reserved",
}


async def test_hostile_bodies_get_400_with_a_reason(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay", secret="k") as hook:
        for name, body in HOSTILE.items():
            signature = f"{webhook.SIGNATURE_HEADER}: {webhook.sign('k', body)}"
            status, answer = await _exchange(hook.port, _raw(body, signature))
            assert status == 400, name
            assert REASONS[name] in answer["error"], (name, answer)
        assert await _stored(pgflow_dsn) == []


async def test_one_bad_post_never_fails_the_others_in_a_group_commit(pgflow_dsn: str) -> None:
    """Issue 10: one signed post with \\u0000 made 20 concurrent valid posts 503 forever,
    and a lone surrogate dropped all 21 connections without an answer."""
    async with webhook.Connector(pgflow_dsn, "pay", secret="k") as hook:

        def signed(body: bytes) -> bytes:
            return _raw(body, f"{webhook.SIGNATURE_HEADER}: {webhook.sign('k', body)}")

        for round_, bad in enumerate((HOSTILE["NUL in a header"], HOSTILE["lone surrogate"])):
            good = [signed(_event(100 * round_ + i)) for i in range(20)]
            answers = await asyncio.gather(
                *(_exchange(hook.port, r) for r in [*good[:10], signed(bad), *good[10:]])
            )
            statuses = [s for s, _ in answers]
            assert statuses == [200] * 10 + [400] + [200] * 10, answers
        # and later posts are not affected either
        assert (await _exchange(hook.port, signed(_event(999))))[0] == 200
        assert len(await _stored(pgflow_dsn)) == 41


async def test_group_commit_isolates_a_value_the_database_refuses(pgflow_dsn: str) -> None:
    """The second fence: a value that got past the codec fails alone, not its batch."""
    from pgflow.connectors._group_commit import GroupCommit, Rejected
    from pgflow.connectors.table import CursorStore
    from pgflow.log.events import NewEvent

    store = CursorStore(pgflow_dsn)
    ingest = GroupCommit(store, "webhook:pay")
    try:
        posts = [NewEvent("webhook:pay", "t", f"o{i}", headers={"i": str(i)}) for i in range(15)]
        posts[7] = NewEvent("webhook:pay", "t", "bad", headers={"a": "\x00"})  # jsonb refuses
        posts[11] = NewEvent("webhook:pay", "t", "bad\ud800")  # no UTF-8 form
        results = await asyncio.gather(
            *(ingest.submit(p, key=f"k{i}") for i, p in enumerate(posts)),
            return_exceptions=True,
        )
        failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        assert failed == [7, 11]
        assert all(isinstance(results[i], Rejected) for i in failed)
        assert len(await _stored(pgflow_dsn)) == 13
        # the rejected keys were not claimed: a corrected retry is stored
        fixed = await ingest.submit(NewEvent("webhook:pay", "t", "fixed"), key="k7")
        assert not fixed.duplicate
    finally:
        await ingest.stop()
        await store.close()


async def test_http_framing_attacks_are_refused(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay") as hook:
        body = _event(1)
        n = len(body)
        cases = {
            "duplicate Content-Length": _raw(body, f"Content-Length: {n}"),
            "conflicting Content-Length": _raw(body, "Content-Length: 3"),
            "Content-Length and chunked": _raw(body, "Transfer-Encoding: chunked"),
            "negative Content-Length": _raw(body, "Content-Length: -1", length=False),
            "NUL in a header": _raw(body, "X-A: a\x00b"),
            "space in a header name": _raw(body, "Bad Name: 1"),
            "garbage": b"\x16\x03\x01 not http\r\n\r\n",
        }
        for name, request in cases.items():
            status, answer = await _exchange(hook.port, request)
            assert status == 400 and answer["error"], name
        assert await _stored(pgflow_dsn) == []
        # chunked alone is fine: the server reassembles it
        chunked = _raw(
            f"{n:x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
            "Transfer-Encoding: chunked",
            length=False,
        )
        assert (await _exchange(hook.port, chunked))[0] == 200


async def test_oversize_head_gets_431(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay") as hook:
        reader, writer = await asyncio.open_connection("127.0.0.1", hook.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\n")
        for _ in range(34):  # headers trickle in: 68 KiB, unfinished
            writer.write(b"X-Pad: " + b"a" * 2000 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.005)
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 431") and b"request head over" in raw


async def test_a_slow_body_gets_408(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay", request_timeout=0.5) as hook:
        reader, writer = await asyncio.open_connection("127.0.0.1", hook.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 408") and b"not received within 0.5 s" in raw


async def test_connection_limit(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay", max_connections=4) as hook:
        idle = [await asyncio.open_connection("127.0.0.1", hook.port) for _ in range(4)]
        await asyncio.sleep(0.1)
        status, answer = await _post(hook.url, _event(1))
        assert (status, answer) == (503, {"text": "Service Unavailable"})  # not dropped
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.2)
        assert (await _post(hook.url, _event(1)))[0] == 200


async def test_an_unexpected_error_still_gets_an_answer(pgflow_dsn: str, monkeypatch: Any) -> None:
    async with webhook.Connector(pgflow_dsn, "pay") as hook:

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

        monkeypatch.setattr(hook._ingest, "submit", broken)
        status, answer = await _post(hook.url, _event(1))
        assert (status, answer) == (500, {"error": "internal error (RuntimeError)"})


async def test_the_app_mounts_in_a_starlette_app_at_any_path(pgflow_dsn: str, pool: Any) -> None:
    import httpx
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route

    hook = webhook.Connector(pgflow_dsn, "pay", port=None, secret="k")
    app = Starlette(routes=[Mount("/hooks/pay", hook.app), Route("/direct/pay", hook.app)])
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for i, path in enumerate(("/hooks/pay/", "/direct/pay")):
                body = _event(i)
                sig = {webhook.SIGNATURE_HEADER: webhook.sign("k", body)}
                answer = await client.post(path, content=body, headers=sig)
                assert answer.status_code == 200, answer.text
                assert answer.json()["id"] == f"evt-{i}"
            bad = await client.post("/direct/pay", content=b'{"foreign_id": "o"}')
            assert bad.status_code == 401
        consumer = await hook.make("pay-consumer")  # port=None: no server of its own
        assert hook.port is None
        events = await take_batch(consumer, pool, 2, limit=10)
        assert [e.id for e in events] == ["evt-0", "evt-1"]
        await consumer.close()
    finally:
        await hook.stop()


def _blocking_post(port: int, request: bytes) -> bytes:
    """What a plain client does: send the whole request, then read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


async def test_a_refused_body_is_drained_so_the_answer_arrives(pgflow_dsn: str) -> None:
    """Closing with unread bytes makes the kernel reset the connection, which a client
    still sending sees instead of the answer; the app reads (and drops) the rest first."""
    async with webhook.Connector(pgflow_dsn, "pay", max_body=1000) as hook:
        big = b"x" * 600_000
        for request in (_raw(big), _raw(big).replace(b"POST", b"PUT", 1)):  # 413, 405
            raw = await asyncio.to_thread(_blocking_post, hook.port, request)
            assert raw.startswith((b"HTTP/1.1 413", b"HTTP/1.1 405")), raw[:100]


async def test_the_app_alone_under_uvicorn_closes_its_pool_on_shutdown(pgflow_dsn: str) -> None:
    """`uvicorn module:hook.app`: the app is the top-level ASGI app and gets lifespan."""
    import uvicorn

    hook = webhook.Connector(pgflow_dsn, "pay", port=None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(hook.app, host="127.0.0.1", port=port, lifespan="on", log_config=None)
    )
    serving = asyncio.create_task(server.serve())
    try:

        async def started() -> bool:
            return bool(server.started)

        await wait_until(started, message="uvicorn started")
        status, _ = await _post(f"http://127.0.0.1:{port}/any/path", _event(1))
        assert status == 200  # mounted or top-level, the app takes any path
        assert hook.store._pool is not None
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
    assert hook.store._pool is None  # lifespan shutdown stopped the connector
