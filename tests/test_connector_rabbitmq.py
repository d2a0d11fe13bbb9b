"""What only the RabbitMQ connector does (real server on 127.0.0.1:5672): one queue
per consumer name, which only receives what is published after it exists — hence
``declare()``. The shared contract is checked by tests/test_connector_conformance.py."""

from __future__ import annotations

import asyncio

import pytest

from pgflow.connectors.memory import event
from tests._brokers import PORTS, rabbitmq_source, up

pytestmark = pytest.mark.skipif(
    not up(PORTS["rabbitmq"]), reason="no RabbitMQ server on 127.0.0.1:5672"
)


async def test_a_queue_gets_what_is_published_after_it_is_declared() -> None:
    async with rabbitmq_source(False) as src:
        await src.publish(event("e0", "o0", "t"))  # no queue yet: nobody gets it
        assert src.prepare is not None
        await src.prepare("late")  # declare(): the queue exists from here on
        await src.publish(event("e1", "o1", "t"))
        consumer = await src.connector.make("late")
        ev, ack = await asyncio.wait_for(consumer.recv(), 10)
        assert ev.id == "e1"
        await ack()
        await consumer.close()
