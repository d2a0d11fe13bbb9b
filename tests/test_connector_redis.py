"""Redis Streams connector against the real server on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from pgflow.connectors import ConnectorConsumer, MalformedEvent
from pgflow.connectors.memory import event

URL = "redis://127.0.0.1:6379"


def _up(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


pytestmark = pytest.mark.skipif(not _up(6379), reason="no Redis server on 127.0.0.1:6379")


@pytest.fixture
async def stream() -> AsyncIterator[str]:
    import redis.asyncio as aioredis

    name = f"pgflow-test-{uuid.uuid4().hex[:10]}"
    yield name
    client = aioredis.from_url(URL)
    await client.delete(name)
    await client.aclose()


async def test_publish_recv_ack_per_group(stream: str) -> None:
    from pgflow.connectors import redis as rc

    conn = rc.Connector(URL, stream, block=timedelta(milliseconds=100))
    try:
        for i in range(3):
            await conn.publish(event(f"e{i}", f"o{i}", "payment.completed", amount=str(i)))
        a = await conn.make("a")
        b = await conn.make("b")
        assert isinstance(a, ConnectorConsumer)
        got = []
        for _ in range(3):
            ev, ack = await asyncio.wait_for(a.recv(), 10)
            got.append((ev.id, ev.foreign_id, ev.headers["amount"]))
            await ack()
        assert got == [("e0", "o0", "0"), ("e1", "o1", "1"), ("e2", "o2", "2")]
        ev, ack = await asyncio.wait_for(b.recv(), 10)  # its own group sees everything
        assert ev.id == "e0"
        await ack()
        await a.close()
        await b.close()
        a2 = await conn.make("a")  # all acked: nothing pending for "a"
        waiting = asyncio.create_task(a2.recv())
        await conn.publish(event("e3", "o3", "t"))
        ev, ack = await asyncio.wait_for(waiting, 10)
        assert ev.id == "e3"
        await ack()
        await a2.close()
    finally:
        await conn.close()


async def test_unacked_entry_is_reclaimed_after_a_crash(stream: str) -> None:
    from pgflow.connectors import redis as rc

    conn = rc.Connector(
        URL, stream, claim_idle=timedelta(milliseconds=200), block=timedelta(milliseconds=50)
    )
    try:
        await conn.publish(event("e1", "o1", "t"))
        first = await conn.make("worker")
        ev, _ack = await asyncio.wait_for(first.recv(), 10)
        assert ev.id == "e1"
        await first.close()  # "crash": never acked; the entry stays pending
        second = await conn.make("worker")
        again, ack = await asyncio.wait_for(second.recv(), 10)
        assert again.id == "e1" and second.claimed == 1
        await ack()
        import redis.asyncio as aioredis

        client = aioredis.from_url(URL)
        pending = await client.xpending(stream, "worker")
        await client.aclose()
        assert pending["pending"] == 0
        await second.close()
    finally:
        await conn.close()


async def test_flat_entries_and_malformed_entries(stream: str) -> None:
    import redis.asyncio as aioredis

    from pgflow.connectors import redis as rc

    client = aioredis.from_url(URL)
    await client.xadd(stream, {"foreign_id": "o1", "type": "t", "amount": "5"})
    await client.xadd(stream, {"event": b"{not json"})
    await client.aclose()
    conn = rc.Connector(URL, stream, block=timedelta(milliseconds=50))
    consumer = await conn.make("flat")
    ev, ack = await asyncio.wait_for(consumer.recv(), 10)
    assert (ev.foreign_id, ev.type, dict(ev.headers)) == ("o1", "t", {"amount": "5"})
    await ack()
    with pytest.raises(MalformedEvent) as info:
        await asyncio.wait_for(consumer.recv(), 10)
    assert "not valid JSON" in info.value.reason
    assert info.value.payload == {"text": "{not json"}
    await info.value.ack()  # dead-lettered by the runner, then acked
    await consumer.close()
