"""What only the Redis Streams connector does (real server on 127.0.0.1:6379): flat
entries, and reclaiming a dead member's pending entries (``XAUTOCLAIM``). The shared
contract is checked by tests/test_connector_conformance.py."""

from __future__ import annotations

import asyncio

import pytest

from pgflow.connectors.memory import event
from tests._brokers import PORTS, REDIS, redis_source, up

pytestmark = pytest.mark.skipif(not up(PORTS["redis"]), reason="no Redis server on 127.0.0.1:6379")


async def test_unacked_entry_is_reclaimed_and_no_longer_pending_once_acked() -> None:
    import redis.asyncio as aioredis

    async with redis_source(True) as src:  # claim_idle 300ms
        conn = src.connector
        await conn.publish(event("e1", "o1", "t"))
        first = await conn.make("worker")
        ev, _ack = await asyncio.wait_for(first.recv(), 10)
        await first.close()  # "crash": never acked; the entry stays pending
        second = await conn.make("worker")
        again, ack = await asyncio.wait_for(second.recv(), 10)
        assert again.id == ev.id == "e1" and second.claimed == 1
        await ack()
        client = aioredis.from_url(REDIS)
        pending = await client.xpending(conn.stream, "worker")
        await client.aclose()
        assert pending["pending"] == 0
        await second.close()


async def test_flat_entries() -> None:
    import redis.asyncio as aioredis

    async with redis_source(False) as src:
        client = aioredis.from_url(REDIS)
        await client.xadd(src.connector.stream, {"foreign_id": "o1", "type": "t", "amount": "5"})
        await client.aclose()
        consumer = await src.connector.make("flat")
        ev, ack = await asyncio.wait_for(consumer.recv(), 10)
        assert (ev.foreign_id, ev.type, dict(ev.headers)) == ("o1", "t", {"amount": "5"})
        await ack()
        await consumer.close()
