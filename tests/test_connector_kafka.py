"""What only the Kafka connector does, against Tansu (tests/_brokers.py starts it):
``publish`` keys records by foreign id, so one entity's events share a partition.
The shared contract is checked by tests/test_connector_conformance.py."""

from __future__ import annotations

import uuid
from collections import defaultdict

from pgflow.connectors.memory import event
from tests._brokers import FAST_GROUPS, create_topics


async def test_publish_keys_by_foreign_id(kafka_broker: str) -> None:
    from pgflow.connectors import kafka

    topic = f"pgflow-test-{uuid.uuid4().hex[:10]}"
    await create_topics(kafka_broker, (topic, 3))
    conn = kafka.Connector(kafka_broker, topic, consumer_options=FAST_GROUPS)
    try:
        partitions: dict[str, set[int]] = defaultdict(set)
        offsets: dict[int, list[int]] = defaultdict(list)
        for i in range(12):
            partition, offset = await conn.publish(event(f"e{i}", f"o{i % 4}", "t"))
            partitions[f"o{i % 4}"].add(partition)
            offsets[partition].append(offset)
        assert all(len(p) == 1 for p in partitions.values()), partitions
        assert all(o == sorted(o) for o in offsets.values()), offsets
    finally:
        await conn.close()
