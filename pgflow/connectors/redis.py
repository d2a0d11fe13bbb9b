"""Redis Streams connector (extra ``pgflow-engine[redis]``).

Each consumer name is a consumer *group* on the stream, so every name sees every
entry; inside a group each :class:`Consumer` instance is a uniquely named group member.
``ack`` is ``XACK``. An entry delivered but never acknowledged (the process crashed)
stays in the group's pending list; live consumers reclaim entries idle for longer than
``claim_idle`` with ``XAUTOCLAIM`` and deliver them again, so nothing is lost. Pick
``claim_idle`` above the longest time a connector function may take, or a slow (not
dead) consumer's entry is processed twice — harmless, since ``trigger`` is idempotent
on the event id, but wasted work.

Entries: a field ``event`` holding the JSON event (what :meth:`Connector.publish`
writes, see :mod:`pgflow.connectors._codec`), or flat fields ``foreign_id``, ``type``,
optional ``id``, every other field becoming a header. The default event id is the
entry id.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
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
    import redis.asyncio as aioredis
    from redis.exceptions import ResponseError
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError(
        "pgflow.connectors.redis needs the redis client: pip install 'pgflow-engine[redis]'"
    ) from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(entry_id: str, fields: dict[Any, Any]) -> RawMessage:
    decoded = {_text(k): v for k, v in fields.items()}
    millis = int(entry_id.split("-", 1)[0])
    stamp = datetime.fromtimestamp(millis / 1000, UTC)
    if "event" in decoded:
        body = decoded["event"]
        body = body if isinstance(body, bytes) else str(body).encode()
        return RawMessage(body, entry_id, {}, stamp)
    flat = {k: _text(v) for k, v in decoded.items()}
    payload: dict[str, Any] = {
        "foreign_id": flat.pop("foreign_id", None),
        "type": flat.pop("type", None),
        "headers": flat,
    }
    if "id" in flat:
        payload["id"] = flat.pop("id")
    return RawMessage(json.dumps(payload).encode(), entry_id, {}, stamp)


class Connector:
    """Consumes one Redis stream; one consumer group per consumer name."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        stream: str = "pgflow",
        *,
        translator: Translator = json_translator,
        claim_idle: timedelta = timedelta(seconds=30),
        block: timedelta = timedelta(seconds=1),
        count: int = 10,
        start_id: str = "0",
    ) -> None:
        if claim_idle <= timedelta(0) or block <= timedelta(0) or count < 1:
            raise ValueError("claim_idle, block and count must be positive")
        self.url = url
        self.stream = stream
        self.translator = translator
        self.claim_idle = claim_idle
        self.block = block
        self.count = count
        self.start_id = start_id  #: where a new group starts: "0" all, "$" new entries only
        self._producer: Any = None

    async def make(self, consumer_name: str) -> Consumer:
        client = aioredis.from_url(self.url)
        try:
            await client.xgroup_create(self.stream, consumer_name, id=self.start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                await client.aclose()
                raise
        return Consumer(self, client, consumer_name)

    async def publish(self, event: ConnectorEvent) -> str:
        """Append ``event`` to the stream (``XADD``); returns the entry id."""
        if self._producer is None:
            self._producer = aioredis.from_url(self.url)
        entry_id = await self._producer.xadd(self.stream, {"event": event_to_json(event)})
        return _text(entry_id)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.aclose()
            self._producer = None


class Consumer:
    """A member of the consumer group ``group`` (unique member name per instance)."""

    def __init__(self, connector: Connector, client: Any, group: str) -> None:
        self.connector = connector
        self.client = client
        self.group = group
        self.member = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._buffer: deque[tuple[str, dict[Any, Any]]] = deque()
        self._next_claim = 0.0
        self.claimed = 0  #: entries reclaimed from dead members, for tests and metrics

    async def recv(self) -> tuple[ConnectorEvent, Ack]:
        c = self.connector
        while not self._buffer:
            if time.monotonic() >= self._next_claim:
                await self._claim()
                self._next_claim = time.monotonic() + c.claim_idle.total_seconds() / 2
                if self._buffer:
                    break
            block_ms = int(c.block.total_seconds() * 1000)
            if self._next_claim > time.monotonic():
                block_ms = max(1, min(block_ms, int((self._next_claim - time.monotonic()) * 1000)))
            reply = await self.client.xreadgroup(
                self.group, self.member, {c.stream: ">"}, count=c.count, block=block_ms
            )
            for _stream, entries in _entries(reply):
                self._buffer.extend((_text(i), f) for i, f in entries if f)
        entry_id, fields = self._buffer.popleft()
        ack = self._ack_for(entry_id)
        return translate(c.translator, _raw(entry_id, fields), ack), ack

    async def _claim(self) -> None:
        """Take over entries other (dead) members received but never acknowledged."""
        c = self.connector
        start = "0-0"
        min_idle = int(c.claim_idle.total_seconds() * 1000)
        while True:
            reply = await self.client.xautoclaim(
                c.stream, self.group, self.member, min_idle, start_id=start, count=c.count
            )
            start = _text(reply[0])
            gone = []
            for entry_id, fields in reply[1]:
                if fields:
                    self._buffer.append((_text(entry_id), fields))
                    self.claimed += 1
                else:  # trimmed from the stream meanwhile: nothing left to deliver
                    gone.append(entry_id)
            if gone:
                await self.client.xack(c.stream, self.group, *gone)
            if start == "0-0" or self._buffer:
                return

    def _ack_for(self, entry_id: str) -> Ack:
        async def ack() -> None:
            await self.client.xack(self.connector.stream, self.group, entry_id)

        return ack

    async def close(self) -> None:
        """Disconnect; entries received but not acked stay pending and are reclaimed."""
        self._buffer.clear()
        await self.client.aclose()


def _entries(reply: Any) -> list[tuple[Any, list[tuple[Any, dict[Any, Any]]]]]:
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        return [(k, v[0] if v and isinstance(v[0], list) else v) for k, v in reply.items()]
    return [(s, e) for s, e in reply]
