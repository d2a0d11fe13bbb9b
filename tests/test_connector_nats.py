"""What only the NATS JetStream connector does (real server on 127.0.0.1:4222):
server-side deduplication of publishes, durable names from any consumer name, and a
graceful close that NAKs in flight messages. The shared contract is checked by
tests/test_connector_conformance.py."""

from __future__ import annotations

import asyncio

import pytest

from pgflow.connectors.memory import event
from tests._brokers import PORTS, up

pytestmark = pytest.mark.skipif(not up(PORTS["nats"]), reason="no NATS server on 127.0.0.1:4222")


async def test_duplicate_publish_is_dropped_and_any_name_is_a_durable() -> None:
    from tests._brokers import nats_source

    async with nats_source(False) as src:
        conn = src.connector
        await conn.publish(event("e0", "o0", "t"))
        await conn.publish(event("e0", "o0", "t"))  # same Nats-Msg-Id: dropped
        await conn.publish(event("e1", "o1", "t"))
        a = await conn.make("orders.payments")  # '.' is not allowed in durable names
        got = []
        for _ in range(2):
            ev, ack = await asyncio.wait_for(a.recv(), 10)
            got.append(ev.id)
            await ack()
        assert got == ["e0", "e1"]
        await a.close()


async def test_a_graceful_close_naks_so_redelivery_does_not_wait_for_ack_wait() -> None:
    from tests._brokers import nats_source

    async with nats_source(False) as src:  # ack_wait 30s
        conn = src.connector
        await conn.publish(event("e1", "o1", "t"))
        first = await conn.make("w")
        ev, _ = await asyncio.wait_for(first.recv(), 10)
        await first.close()
        second = await conn.make("w")
        again, ack = await asyncio.wait_for(second.recv(), 5)
        assert again.id == ev.id == "e1"
        await ack()
        await second.close()
