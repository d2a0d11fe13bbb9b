"""RabbitMQ connector (extra ``pgflow-engine[rabbitmq]``, aio-pika).

Events are published to a durable topic ``exchange`` with the event type as routing
key. Each consumer name gets its own durable queue (``queue_prefix + name``) bound
with ``routing_keys``, so every name sees every event. ``ack`` is ``message.ack()``,
sent after the connector function's effects committed; a message delivered but not
acknowledged when its channel closes (the process crashed or stopped) is requeued by
the broker and delivered again (``redelivered`` set).

A queue only receives what is published after it exists: :meth:`Connector.declare`
creates a consumer's queue ahead of the first ``make`` (e.g. at deploy time).
The default event id is the AMQP ``message_id`` when the body has no ``id``.
"""

from __future__ import annotations

from collections.abc import Sequence
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

try:
    import aio_pika
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "pgflow.connectors.rabbitmq needs aio-pika: pip install 'pgflow-engine[rabbitmq]'"
    ) from exc


class Connector:
    """Consumes a topic exchange through one durable queue per consumer name."""

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        exchange: str = "pgflow",
        *,
        routing_keys: Sequence[str] = ("#",),
        queue_prefix: str = "pgflow.",
        translator: Translator = json_translator,
        prefetch: int = 10,
    ) -> None:
        if not routing_keys or prefetch < 1:
            raise ValueError("routing_keys must not be empty and prefetch must be positive")
        self.url = url
        self.exchange = exchange
        self.routing_keys = list(routing_keys)
        self.queue_prefix = queue_prefix
        self.translator = translator
        self.prefetch = prefetch
        self._producer: Any = None
        self._producer_exchange: Any = None

    def queue_name(self, consumer_name: str) -> str:
        return self.queue_prefix + consumer_name

    async def _declare(self, channel: Any, consumer_name: str | None) -> tuple[Any, Any]:
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        if consumer_name is None:
            return exchange, None
        queue = await channel.declare_queue(self.queue_name(consumer_name), durable=True)
        for key in self.routing_keys:
            await queue.bind(exchange, key)
        return exchange, queue

    async def declare(self, consumer_name: str) -> None:
        """Create (idempotently) the exchange and ``consumer_name``'s bound queue."""
        connection = await aio_pika.connect(self.url)
        try:
            await self._declare(await connection.channel(), consumer_name)
        finally:
            await connection.close()

    async def make(self, consumer_name: str) -> Consumer:
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            _, queue = await self._declare(channel, consumer_name)
            iterator = queue.iterator()
        except BaseException:
            await connection.close()
            raise
        return Consumer(self, connection, iterator)

    async def publish(self, event: ConnectorEvent, routing_key: str | None = None) -> None:
        """Publish ``event`` persistently; returns once the broker confirmed it."""
        if self._producer is None:
            self._producer = await aio_pika.connect(self.url)
            channel = await self._producer.channel()  # publisher confirms are on
            self._producer_exchange, _ = await self._declare(channel, None)
        await self._producer_exchange.publish(
            aio_pika.Message(
                event_to_json(event),
                message_id=event.id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key or event.type,
        )

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.close()
            self._producer = None


class Consumer:
    """Delivers messages of one queue; unacked ones are requeued when it closes."""

    def __init__(self, connector: Connector, connection: Any, iterator: Any) -> None:
        self.connector = connector
        self.connection = connection
        self._iterator = iterator

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        message = await self._iterator.__anext__()

        async def ack() -> None:
            await message.ack()

        headers = {str(k): v for k, v in (message.headers or {}).items() if isinstance(v, str)}
        raw = RawMessage(
            message.body,
            message.message_id or f"{message.routing_key}:{message.delivery_tag}",
            headers,
            message.timestamp,
        )
        return translate(self.connector.translator, raw, ack), ack

    async def close(self) -> None:
        await self.connection.close()
