"""Every shipped broker connector against the conformance suite
(pgflow.testing.connectors): memory (transactional and broker-like), NATS, RabbitMQ,
Redis and Kafka (Tansu). What only one connector does is tested in its own file."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pgflow.connectors import Ack, ConnectorEvent
from pgflow.testing.connectors import CHECKS, Check, Source, run_connector_conformance
from tests._brokers import BROKERS, memory_source, source_factory


@pytest.mark.parametrize("check", CHECKS.values(), ids=list(CHECKS))
@pytest.mark.parametrize("broker", BROKERS)
async def test_conformance(
    request: pytest.FixtureRequest, broker: str, check: Check, pgflow_dsn: str
) -> None:
    await check(source_factory(request, broker), pgflow_dsn)


class _AcksOnDelivery:
    """A broken connector: the memory broker's consumer acks each event as it hands it
    out (what "ack before commit" does to a broker), so nothing is ever redelivered."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def make(self, consumer_name: str) -> Any:
        return _AckingConsumer(await self.inner.make(consumer_name))


class _AckingConsumer:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        ev, ack = await self.inner.recv()
        await ack()

        async def nothing() -> None:
            return None

        return ev, nothing

    async def close(self) -> None:
        await self.inner.close()


async def test_the_suite_passes_memory_and_fails_a_connector_that_acks_on_delivery(
    pgflow_dsn: str,
) -> None:
    report = await run_connector_conformance(memory_source, pgflow_dsn)
    assert report.passed == [n for n in CHECKS if "malformed" not in n]
    assert set(report.not_applicable) == {"malformed", "workflow_malformed"}

    @contextlib.asynccontextmanager
    async def broken(fast_redelivery: bool) -> AsyncIterator[Source]:
        async with memory_source(fast_redelivery, broker=True) as src:
            yield dataclasses.replace(src, connector=_AcksOnDelivery(src.connector), timeout=1)

    checks = ["delivery", "redelivery_after_close", "redelivery_after_crash", "workflow_crash"]
    with pytest.raises(AssertionError) as info:
        await run_connector_conformance(broken, pgflow_dsn, only=checks)
    failed = [line.split(":")[0] for line in str(info.value).splitlines()[1:]]
    assert failed == checks[1:], str(info.value)  # delivery itself still works
