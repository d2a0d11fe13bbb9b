"""NATS JetStream connector against the real server on 127.0.0.1:4222."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from pgflow.connectors import ConnectorConsumer, MalformedEvent
from pgflow.connectors.memory import event

SERVERS = "nats://127.0.0.1:4222"


def _up(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


pytestmark = pytest.mark.skipif(not _up(4222), reason="no NATS server on 127.0.0.1:4222")


@pytest.fixture
async def names() -> AsyncIterator[tuple[str, str]]:
    import nats

    suffix = uuid.uuid4().hex[:10]
    stream, subject = f"PGFLOWT_{suffix}", f"pgflowt{suffix}"
    yield stream, subject
    nc = await nats.connect(SERVERS)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream(stream)
    await nc.close()


def _connector(names: tuple[str, str], **kw: Any) -> Any:
    from pgflow.connectors import nats as nc

    stream, subject = names
    return nc.Connector(
        SERVERS, stream, [f"{subject}.>"], fetch_timeout=timedelta(milliseconds=200), **kw
    )


async def test_publish_recv_ack_and_durable_positions(names: tuple[str, str]) -> None:
    conn = _connector(names)
    try:
        for i in range(3):
            await conn.publish(event(f"e{i}", f"o{i}", "payment.completed", amount=str(i)))
        await conn.publish(event("e0", "o0", "payment.completed"))  # duplicate id: dropped
        a = await conn.make("orders.payments")  # '.' is not allowed in durable names
        assert isinstance(a, ConnectorConsumer)
        got = []
        for _ in range(2):
            ev, ack = await asyncio.wait_for(a.recv(), 10)
            got.append((ev.id, ev.headers["amount"]))
            await ack()
        await a.close()
        b = await conn.make("other")
        ev, ack = await asyncio.wait_for(b.recv(), 10)
        assert ev.id == "e0"  # its own durable consumer starts at the beginning
        await ack()
        await b.close()
        a = await conn.make("orders.payments")  # resumes after the acked messages
        ev, ack = await asyncio.wait_for(a.recv(), 10)
        assert ev.id == "e2" and got == [("e0", "0"), ("e1", "1")]
        await ack()
        waiting = asyncio.create_task(a.recv())
        await conn.publish(event("e3", "o3", "t"))
        ev, ack = await asyncio.wait_for(waiting, 10)
        assert ev.id == "e3"
        await ack()
        await a.close()
    finally:
        await conn.close()


async def test_unacked_message_is_redelivered_after_a_crash(names: tuple[str, str]) -> None:
    conn = _connector(names, ack_wait=timedelta(seconds=1))
    try:
        await conn.publish(event("e1", "o1", "t"))
        first = await conn.make("w")
        ev, _ = await asyncio.wait_for(first.recv(), 10)
        assert ev.id == "e1"
        await first.nc.close()  # crash: no ack, no nak — the server's ack_wait expires
        second = await conn.make("w")
        again, ack = await asyncio.wait_for(second.recv(), 15)
        assert again.id == "e1"
        await ack()
        # A graceful close NAKs what was in flight: redelivered without waiting.
        await conn.publish(event("e2", "o2", "t"))
        ev2, _ = await asyncio.wait_for(second.recv(), 10)
        assert ev2.id == "e2"
        await second.close()
        third = await conn.make("w")
        again2, ack2 = await asyncio.wait_for(third.recv(), 5)
        assert again2.id == "e2"
        await ack2()
        await third.close()
    finally:
        await conn.close()


async def test_malformed_message(names: tuple[str, str]) -> None:
    import nats

    conn = _connector(names)
    stream, subject = names
    consumer = await conn.make("m")  # creates the stream
    nc = await nats.connect(SERVERS)
    await nc.jetstream().publish(f"{subject}.x", b'{"foreign_id": "o1"}')
    await nc.close()
    with pytest.raises(MalformedEvent) as info:
        await asyncio.wait_for(consumer.recv(), 10)
    assert "missing field 'type'" in info.value.reason
    assert info.value.event_id == f"{stream}:1"
    await info.value.ack()
    await consumer.close()
