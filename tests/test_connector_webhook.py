"""The webhook connector over real HTTP and real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgflow.connectors import TransactionalConsumer, webhook
from tests._util import take_batch


async def _post(
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    length: int | None = None,
) -> tuple[int, dict[str, Any]]:
    host, _, rest = url.removeprefix("http://").partition(":")
    port, _, path = rest.partition("/")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = f"{method} /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        head += f"Content-Length: {len(body) if length is None else length}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        writer.write(head.encode() + b"\r\n" + (body if length is None else b""))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(raw.split(b" ", 2)[1])
    return status, json.loads(raw.split(b"\r\n\r\n", 1)[1] or b"{}")


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
        ev2, ack2 = await asyncio.wait_for(consumer.recv(), 10)  # plain recv works too
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


async def test_signatures(pgflow_dsn: str) -> None:
    async with webhook.Connector(pgflow_dsn, "pay", secret="s3cret") as hook:
        body = _event(1)
        assert (await _post(hook.url, body))[0] == 401
        status, answer = await _post(
            hook.url, body, {webhook.SIGNATURE_HEADER: webhook.sign("wrong", body)}
        )
        assert (status, answer["error"]) == (401, "bad signature")
        tampered = {webhook.SIGNATURE_HEADER: webhook.sign("s3cret", body + b" ")}
        assert (await _post(hook.url, body, tampered))[0] == 401
        good = {webhook.SIGNATURE_HEADER: webhook.sign("s3cret", body)}
        assert (await _post(hook.url, body, good))[0] == 200
        assert len(await _stored(pgflow_dsn)) == 1


async def test_database_down_gives_503_not_200(pgflow_dsn: str) -> None:
    dead = make_conninfo(pgflow_dsn, dbname="no_such_database_here")
    async with webhook.Connector(dead, "pay") as hook:
        status, answer = await _post(hook.url, _event(1))
        assert status == 503 and "retry" in answer["error"]


async def test_keep_alive_and_concurrent_posts_group_commit(pgflow_dsn: str) -> None:
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
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()
        results = await asyncio.gather(*(_post(hook.url, _event(i)) for i in range(10, 60)))
        assert {s for s, _ in results} == {200}
        assert len(await _stored(pgflow_dsn)) == 53
        assert hook.accepted == 53


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
