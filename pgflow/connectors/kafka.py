"""Kafka connector (extra ``pgflow-engine[kafka]``, aiokafka).

Each consumer name is a Kafka consumer group on ``topic`` (``group_prefix + name``),
so every name sees every record. Offsets are committed by ``ack`` — never
automatically — and only over a contiguous acknowledged prefix per partition (an
offset commit acknowledges everything before it), so a record delivered but not
acknowledged when the consumer stops or crashes is delivered again to the group's
next member. A commit refused because the partition moved to another member during a
rebalance is logged and dropped: the new owner redelivers from the last committed
offset, and ``trigger`` deduplicates on the event id.

:meth:`Connector.publish` keys records by ``foreign_id`` so one entity's events stay
in one partition, in order. The default event id is ``<topic>-<partition>-<offset>``.
Tested against Tansu (a Kafka-protocol broker; see the test suite).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pgflow.connectors._base import Ack, ConnectorEvent
from pgflow.connectors._codec import (
    RawMessage,
    Translator,
    event_to_json,
    json_translator,
    translate,
)

__all__ = ["Connector", "Consumer"]

logger = logging.getLogger(__name__)

try:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.errors import CommitFailedError, KafkaError
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "pgflow.connectors.kafka needs aiokafka: pip install 'pgflow-engine[kafka]'"
    ) from exc


class Connector:
    """Consumes one topic; one consumer group per consumer name."""

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str] = "127.0.0.1:9092",
        topic: str = "pgflow",
        *,
        translator: Translator = json_translator,
        group_prefix: str = "pgflow.",
        auto_offset_reset: str = "earliest",
        consumer_options: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.translator = translator
        self.group_prefix = group_prefix
        self.auto_offset_reset = auto_offset_reset
        self.consumer_options = dict(consumer_options or {})
        self._producer: Any = None

    async def make(self, consumer_name: str) -> Consumer:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_prefix + consumer_name,
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            **self.consumer_options,
        )
        await consumer.start()
        return Consumer(self, consumer)

    async def publish(self, event: ConnectorEvent) -> tuple[int, int]:
        """Send ``event`` keyed by its foreign id; returns ``(partition, offset)``."""
        if self._producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all")
            await producer.start()
            self._producer = producer
        meta = await self._producer.send_and_wait(
            self.topic, event_to_json(event), key=event.foreign_id.encode()
        )
        return int(meta.partition), int(meta.offset)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


class _PartitionAcks:
    """Delivered offsets of one partition and which are acknowledged."""

    def __init__(self) -> None:
        self.pending: dict[int, bool] = {}  # offset -> acked, in delivery order

    def commit_point(self) -> int | None:
        """The offset to commit (next to read) after the acknowledged prefix, if any."""
        upto = None
        for offset in list(self.pending):
            if not self.pending[offset]:
                break
            del self.pending[offset]
            upto = offset + 1
        return upto


class Consumer:
    """A member of the consumer group; commits offsets as records are acknowledged."""

    def __init__(self, connector: Connector, consumer: Any) -> None:
        self.connector = connector
        self.consumer = consumer
        self._acks: dict[Any, _PartitionAcks] = {}

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        record = await self.consumer.getone()
        tp = TopicPartition(record.topic, record.partition)
        self._acks.setdefault(tp, _PartitionAcks()).pending[record.offset] = False
        ack = self._ack_for(tp, record.offset)
        headers = {
            str(k): v.decode(errors="replace") for k, v in (record.headers or ()) if v is not None
        }
        stamp = datetime.fromtimestamp(record.timestamp / 1000, UTC) if record.timestamp else None
        raw = RawMessage(
            record.value or b"",
            f"{record.topic}-{record.partition}-{record.offset}",
            headers,
            stamp,
        )
        return translate(self.connector.translator, raw, ack), ack

    def _ack_for(self, tp: Any, offset: int) -> Ack:
        async def ack() -> None:
            acks = self._acks.get(tp)
            if acks is None or offset not in acks.pending:
                return
            acks.pending[offset] = True
            upto = acks.commit_point()
            if upto is None:
                return
            try:
                await self.consumer.commit({tp: upto})
            except (CommitFailedError, KafkaError) as exc:
                logger.warning(
                    "kafka commit of %s@%d failed (%s); it will be redelivered", tp, upto, exc
                )

        return ack

    async def close(self) -> None:
        """Leave the group without committing what was not acknowledged."""
        self._acks.clear()
        await self.consumer.stop()
