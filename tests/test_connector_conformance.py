"""Every shipped broker connector against the conformance suite
(pgflow.testing.connectors): memory (transactional and broker-like), NATS, RabbitMQ,
Redis and Kafka (Tansu). What only one connector does is tested in its own file."""

from __future__ import annotations

import pytest

from pgflow.testing.connectors import CHECKS, Check
from tests._brokers import BROKERS, source_factory


@pytest.mark.parametrize("check", CHECKS.values(), ids=list(CHECKS))
@pytest.mark.parametrize("broker", BROKERS)
async def test_conformance(
    request: pytest.FixtureRequest, broker: str, check: Check, pgflow_dsn: str
) -> None:
    await check(source_factory(request, broker), pgflow_dsn)
