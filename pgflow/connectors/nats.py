"""NATS JetStream connector (extra ``pgflow-engine[nats]``).

Each consumer name is a durable JetStream pull consumer on ``stream`` (created on
first use, filtered to ``filter_subject``), so every name sees every message and keeps
its own position on the server. ``ack`` is ``msg.ack()``. A message delivered but not
acknowledged within ``ack_wait`` (the process crashed) is redelivered by the server;
:meth:`Consumer.close` NAKs in-flight messages so a graceful restart redelivers them
at once.

Messages carry the JSON event of :mod:`pgflow.connectors._codec`;
:meth:`Connector.publish` sends it with ``Nats-Msg-Id`` set to the event id, so the
server drops duplicate publishes inside its deduplication window. The default event
id is ``<stream>:<stream sequence>``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from pgflow.connectors._base import Ack, ConnectorEvent
from pgflow.connectors._codec import (
    RawMessage,
    Translator,
    event_to_json,
    json_translator,
    translate,
)

__all__ = ["Connector", "Consumer", "durable_name"]

try:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "pgflow.connectors.nats needs nats-py: pip install 'pgflow-engine[nats]'"
    ) from exc


def durable_name(consumer_name: str) -> str:
    """A JetStream-safe durable name for ``consumer_name`` (no ``. * >`` or spaces)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", consumer_name)


class Connector:
    """Consumes a JetStream stream; one durable consumer per consumer name."""

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        stream: str = "PGFLOW",
        subjects: Sequence[str] = ("pgflow.>",),
        *,
        filter_subject: str | None = None,
        translator: Translator = json_translator,
        ack_wait: timedelta = timedelta(seconds=30),
        create_stream: bool = True,
        fetch_batch: int = 10,
        fetch_timeout: timedelta = timedelta(seconds=1),
    ) -> None:
        if not subjects:
            raise ValueError("subjects must not be empty")
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.stream = stream
        self.subjects = list(subjects)
        self.filter_subject = filter_subject
        self.translator = translator
        self.ack_wait = ack_wait
        self.create_stream = create_stream
        self.fetch_batch = fetch_batch
        self.fetch_timeout = fetch_timeout
        self._producer: Any = None

    async def _ensure_stream(self, js: Any) -> None:
        if not self.create_stream:
            return
        try:
            await js.stream_info(self.stream)
        except NotFoundError:
            await js.add_stream(name=self.stream, subjects=self.subjects)

    async def make(self, consumer_name: str) -> Consumer:
        nc = await nats.connect(servers=self.servers)
        try:
            js = nc.jetstream()
            await self._ensure_stream(js)
            durable = durable_name(consumer_name)
            config = ConsumerConfig(
                durable_name=durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self.ack_wait.total_seconds(),
                filter_subject=self.filter_subject,
            )
            sub = await js.pull_subscribe(
                self.filter_subject or self.subjects[0],
                durable=durable,
                stream=self.stream,
                config=config,
            )
        except BaseException:
            await nc.close()
            raise
        return Consumer(self, nc, sub, consumer_name)

    async def publish(self, event: ConnectorEvent, subject: str | None = None) -> int:
        """Publish ``event`` (to ``subject``, default ``<first subject prefix>.<type>``);
        returns the stream sequence once JetStream stored it."""
        if self._producer is None:
            self._producer = await nats.connect(servers=self.servers)
            await self._ensure_stream(self._producer.jetstream())
        js = self._producer.jetstream()
        target = subject or self.subjects[0].rstrip(">*").rstrip(".") + "." + event.type
        ack = await js.publish(target, event_to_json(event), headers={"Nats-Msg-Id": event.id})
        return int(ack.seq)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.close()
            self._producer = None


class Consumer:
    """A durable pull consumer; fetches in small batches and hands them out one by one."""

    def __init__(self, connector: Connector, nc: Any, sub: Any, name: str) -> None:
        self.connector = connector
        self.nc = nc
        self.sub = sub
        self.name = name
        self._buffer: deque[Any] = deque()
        self._in_flight: dict[int, Any] = {}

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        c = self.connector
        while not self._buffer:
            try:
                msgs = await self.sub.fetch(c.fetch_batch, timeout=c.fetch_timeout.total_seconds())
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            self._buffer.extend(msgs)
        msg = self._buffer.popleft()
        meta = msg.metadata
        seq = int(meta.sequence.stream)
        self._in_flight[seq] = msg
        ack = self._ack_for(seq, msg)
        raw = RawMessage(
            msg.data,
            f"{c.stream}:{seq}",
            {k: v for k, v in (msg.headers or {}).items() if isinstance(v, str)},
            meta.timestamp,
        )
        return translate(c.translator, raw, ack), ack

    def _ack_for(self, seq: int, msg: Any) -> Ack:
        async def ack() -> None:
            await msg.ack()
            self._in_flight.pop(seq, None)

        return ack

    async def close(self) -> None:
        """NAK what was received but not acked (redelivered at once), then disconnect."""
        for msg in [*self._in_flight.values(), *self._buffer]:
            try:
                await msg.nak()
            except Exception:  # best effort: ack_wait redelivers it anyway
                break
        self._in_flight.clear()
        self._buffer.clear()
        await self.nc.close()
