"""RabbitMQ connector against the real server on 127.0.0.1:5672 (guest/guest)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pgflow.connectors import ConnectorConsumer, MalformedEvent
from pgflow.connectors.memory import event

URL = "amqp://guest:guest@127.0.0.1:5672/"


def _up(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


pytestmark = pytest.mark.skipif(not _up(5672), reason="no RabbitMQ server on 127.0.0.1:5672")


@pytest.fixture
async def connector() -> AsyncIterator[Any]:
    import aio_pika

    from pgflow.connectors import rabbitmq

    suffix = uuid.uuid4().hex[:10]
    conn = rabbitmq.Connector(
        URL, f"pgflow-test-{suffix}", queue_prefix=f"pgflow-test-{suffix}.", prefetch=5
    )
    yield conn
    await conn.close()
    connection = await aio_pika.connect(URL)
    channel = await connection.channel()
    for name in ("a", "b", "w", "m"):
        await channel.queue_delete(conn.queue_name(name))
    await channel.exchange_delete(conn.exchange)
    await connection.close()


async def test_publish_recv_ack_queue_per_consumer(connector: Any) -> None:
    await connector.declare("a")
    await connector.declare("b")
    for i in range(3):
        await connector.publish(event(f"e{i}", f"o{i}", "payment.completed", amount=str(i)))
    a = await connector.make("a")
    assert isinstance(a, ConnectorConsumer)
    got = []
    for _ in range(3):
        ev, ack = await asyncio.wait_for(a.recv(), 10)
        got.append((ev.id, ev.type, ev.headers["amount"]))
        await ack()
    assert got == [(f"e{i}", "payment.completed", str(i)) for i in range(3)]
    b = await connector.make("b")
    ev, ack = await asyncio.wait_for(b.recv(), 10)
    assert ev.id == "e0"
    await ack()
    await a.close()
    await b.close()


async def test_unacked_message_is_redelivered_after_a_crash(connector: Any) -> None:
    await connector.declare("w")
    await connector.publish(event("e1", "o1", "t"))
    await connector.publish(event("e2", "o2", "t"))
    first = await connector.make("w")
    ev, ack = await asyncio.wait_for(first.recv(), 10)
    await ack()
    ev2, _ = await asyncio.wait_for(first.recv(), 10)
    assert (ev.id, ev2.id) == ("e1", "e2")
    await first.close()  # the connection drops with e2 unacked: requeued
    second = await connector.make("w")
    again, ack = await asyncio.wait_for(second.recv(), 10)
    assert again.id == "e2"
    await ack()
    await second.close()


async def test_malformed_message(connector: Any) -> None:
    import aio_pika

    consumer = await connector.make("m")
    connection = await aio_pika.connect(URL)
    channel = await connection.channel()
    exchange = await channel.get_exchange(connector.exchange)
    await exchange.publish(aio_pika.Message(b"\xff\xfe", message_id="bad-1"), routing_key="x")
    await connection.close()
    with pytest.raises(MalformedEvent) as info:
        await asyncio.wait_for(consumer.recv(), 10)
    assert info.value.event_id == "bad-1" and info.value.payload == {"hex": "fffe"}
    await info.value.ack()
    await consumer.close()
