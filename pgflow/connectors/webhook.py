"""A webhook connector: an HTTP endpoint that turns JSON posts into events.

Usage::

    from pgflow.connectors import webhook
    hook = webhook.Connector(dsn, "payments", port=8080, secret=os.environ["HOOK_SECRET"])
    builder.add_connector("payments", hook, handle_payment)
    # POST http://host:8080/  {"id": "evt-1", "foreign_id": "order-1",
    #                          "type": "payment.completed", "headers": {"amount": "12"}}

Durability first. A post is answered ``200`` only after its event is committed to
``pgflow.events`` (stream ``"webhook:<name>"``): concurrent posts are group-committed,
one transaction per batch, and each waits for its batch's commit. The workflow side
then consumes that stream by cursor exactly like the table connector
(:class:`~pgflow.connectors.TransactionalConsumer`: the cursor advances in the same
transaction as the connector function's effects), so an accepted post triggers its
workflow exactly once, and a sender that got no ``200`` (crash, ``503``) can retry —
with an ``id`` in the body, ``trigger`` deduplicates the retry.

Responses: ``400`` with ``{"error": reason}`` for a body that is not a JSON event
(see :mod:`pgflow.connectors._codec` for the format), ``401`` for a missing or wrong
signature, ``404`` for another path, ``405`` for a method other than POST, ``411``
without ``Content-Length`` (chunked bodies are not accepted), ``413`` for a body over
``max_body`` bytes (not read), ``503`` when the database is unavailable.

Signatures: with ``secret``, the ``X-Pgflow-Signature`` header must be
``sha256=<hex HMAC-SHA256 of the raw body>`` (:func:`sign` computes it).

The server is plain asyncio streams with HTTP/1.1 keep-alive; put TLS and public
exposure behind a reverse proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from ..errors import ConfigError, DatabaseUnavailable
from ..events import NewEvent, Position, append
from ..streamer import Filter, read_batch
from ._base import ConnectorEvent
from ._codec import event_from_json
from .table import Connector as TableConnector
from .table import CursorStore, Row, TableConsumer

__all__ = ["Connector", "EventLogStream", "SIGNATURE_HEADER", "sign"]

logger = logging.getLogger("pgflow.connectors.webhook")

SIGNATURE_HEADER = "X-Pgflow-Signature"
_ID_HEADER = "pgflow.webhook.id"  # the sender's event id, kept on the stored event
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def sign(secret: str | bytes, body: bytes) -> str:
    """The signature header value for ``body``: ``sha256=<hex>``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


class EventLogStream:
    """A :class:`~pgflow.connectors.table.Source` over one stream of ``pgflow.events``."""

    def __init__(self, stream: str) -> None:
        self.filter = Filter(stream)

    @property
    def label(self) -> str:
        return self.filter.stream

    async def read(
        self, conn: AsyncConnection[Any], after: Position, limit: int
    ) -> list[tuple[Position, Row]]:
        events = await read_batch(conn, self.filter, after, limit)
        return [
            (
                e.position,
                {
                    "id": e.id,
                    "foreign_id": e.foreign_id,
                    "type": e.type,
                    "headers": e.headers,
                    "created_at": e.created_at,
                },
            )
            for e in events
        ]


def _stored_event(row: Row) -> ConnectorEvent:
    headers = dict(row["headers"])
    event_id = headers.pop(_ID_HEADER, None) or f"webhook-{row['id']}"
    created = row["created_at"]
    assert isinstance(created, datetime)
    return ConnectorEvent(event_id, row["foreign_id"], row["type"], headers, created)


class _HttpError(Exception):
    def __init__(self, status: int, reason: str, close: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.close = close


class _GroupCommit:
    """Appends events in batches: one transaction per batch, each caller waits for it."""

    def __init__(self, store: CursorStore, max_batch: int = 500) -> None:
        self.store = store
        self.max_batch = max_batch
        self._pending: list[tuple[NewEvent, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.on_commit: list[Any] = []

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="pgflow-webhook-ingest")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(ConnectionError("webhook connector stopped"))
        self._pending.clear()

    async def submit(self, event: NewEvent) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((event, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                try:
                    pool = await self.store.pool()
                    async with pool.connection() as conn, conn.transaction():
                        ids = await append(conn, [e for e, _ in batch])
                except Exception as exc:  # every waiter learns it was not stored
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), log_id in zip(batch, ids, strict=True):
                    if not fut.done():
                        fut.set_result(log_id)
                for callback in self.on_commit:
                    callback()


class Connector:
    """An HTTP endpoint writing events to ``pgflow.events`` and a cursor consumer of them.

    ``db`` is the workflow's database (DSN or pool). The server starts on the first
    ``make()`` (or explicitly with ``start()`` / ``async with``); ``url`` is where to
    post once it runs (``port=0`` picks a free port).
    """

    def __init__(
        self,
        db: str | AsyncConnectionPool[Any],
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/",
        secret: str | bytes | None = None,
        max_body: int = 1 << 20,
        request_timeout: float = 30.0,
        poll_interval: float = 0.5,
        batch_size: int = 100,
    ) -> None:
        if not name:
            raise ValueError("webhook connector needs a name")
        if max_body < 1:
            raise ValueError("max_body must be positive")
        self.name = name
        self.stream = f"webhook:{name}"
        self.host = host
        self.port = port
        self.path = path
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.store = CursorStore(db, pool_size=4)
        self.reader = TableConnector(
            EventLogStream(self.stream),
            self.store,
            _stored_event,
            batch_size=batch_size,
            poll_interval=poll_interval,
            cursor_stream=self.stream,
        )
        self._ingest = _GroupCommit(self.store)
        self._ingest.on_commit.append(self.reader.wake)
        self._server: asyncio.Server | None = None
        self._start_lock = asyncio.Lock()
        self._consumers = 0
        self._auto_started = False
        self.accepted = 0  #: events made durable, for tests and metrics
        self.rejected = 0  #: requests answered with an error

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    async def start(self) -> None:
        async with self._start_lock:
            if self._server is not None:
                return
            try:
                server = await asyncio.start_server(
                    self._serve, self.host, self.port, limit=64 * 1024
                )
            except OSError as exc:
                raise ConfigError(
                    f"webhook {self.name!r}: cannot listen on {self.host}:{self.port}:"
                    f" {os.strerror(exc.errno) if exc.errno else exc}"
                    " (is another process using the port?)"
                ) from None
            self._ingest.start()
            self._server = server
            sock = self._server.sockets[0]
            self.port = int(sock.getsockname()[1])
            logger.info("webhook %s listening on %s", self.name, self.url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        await self._ingest.stop()
        await self.store.close()

    async def close(self) -> None:
        await self.stop()

    async def __aenter__(self) -> Connector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def make(self, consumer_name: str) -> TableConsumer:
        """A cursor consumer of the posted events; starts the server if needed. A server
        started this way stops when the last consumer closes (the workflow stopped)."""
        if self._server is None:
            await self.start()
            self._auto_started = True
        consumer = _Consumer(self.reader, consumer_name, self)
        self._consumers += 1
        return consumer

    async def _consumer_closed(self) -> None:
        self._consumers -= 1
        if self._consumers <= 0 and self._auto_started:
            self._auto_started = False
            await self.stop()

    # -- HTTP ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            keep_alive = True
            while keep_alive:
                try:
                    head = await asyncio.wait_for(
                        reader.readuntil(b"\r\n\r\n"), self.request_timeout
                    )
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self._respond(writer, 431, {"error": "request head too large"}, False)
                    return
                try:
                    method, target, version, headers = _parse_head(head)
                    keep_alive = _keep_alive(version, headers)
                    status, body = await self._handle(method, target, headers, reader)
                except _HttpError as err:
                    self.rejected += 1
                    status, body = err.status, {"error": err.reason}
                    keep_alive = keep_alive and not err.close
                await self._respond(writer, status, body, keep_alive)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    async def _handle(
        self, method: str, target: str, headers: Mapping[str, str], reader: asyncio.StreamReader
    ) -> tuple[int, dict[str, Any]]:
        length_text = headers.get("content-length")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _HttpError(411, "chunked bodies are not accepted: send Content-Length", True)
        length = 0
        if length_text is not None:
            if not length_text.isdigit():
                raise _HttpError(400, "bad Content-Length", close=True)
            length = int(length_text)
        if length > self.max_body:
            raise _HttpError(
                413, f"body of {length} bytes exceeds the {self.max_body}-byte limit", close=True
            )
        # Read the body before deciding anything else, so keep-alive stays in sync.
        try:
            body = await asyncio.wait_for(reader.readexactly(length), self.request_timeout)
        except TimeoutError:
            raise _HttpError(408, "timed out reading the body", close=True) from None
        if target.split("?", 1)[0] != self.path:
            raise _HttpError(404, f"no webhook at {target}; post to {self.path}")
        if method != "POST":
            raise _HttpError(405, "use POST")
        if length_text is None:
            raise _HttpError(411, "Content-Length required", close=True)
        if self.secret is not None:
            given = headers.get(SIGNATURE_HEADER.lower(), "")
            if not given:
                raise _HttpError(401, f"missing {SIGNATURE_HEADER} header")
            if not hmac.compare_digest(given.strip(), sign(self.secret, body)):
                raise _HttpError(401, "bad signature")
        try:
            event = event_from_json(body, default_id="")
        except ValueError as exc:
            raise _HttpError(400, str(exc)) from None
        stored_headers = dict(event.headers)
        if event.id:
            stored_headers[_ID_HEADER] = event.id
        try:
            log_id = await self._ingest.submit(
                NewEvent(self.stream, event.type, event.foreign_id, headers=stored_headers)
            )
        except (psycopg.Error, OSError, ConnectionError, DatabaseUnavailable) as exc:
            logger.warning("webhook %s: could not store event (%s)", self.name, exc)
            raise _HttpError(503, "event not stored (database unavailable); retry") from None
        self.accepted += 1
        return 200, {"id": event.id or f"webhook-{log_id}", "position": log_id}

    async def _respond(
        self, writer: asyncio.StreamWriter, status: int, body: Mapping[str, Any], keep_alive: bool
    ) -> None:
        payload = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
        )
        if status == 405:
            head += "Allow: POST\r\n"
        if status == 503:
            head += "Retry-After: 1\r\n"
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()


class _Consumer(TableConsumer):
    """A cursor consumer that tells its webhook connector when it closes."""

    def __init__(self, reader: TableConnector, name: str, hook: Connector) -> None:
        super().__init__(reader, name)
        self._hook: Connector | None = hook

    async def close(self) -> None:
        await super().close()
        hook, self._hook = self._hook, None
        if hook is not None:
            await hook._consumer_closed()


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    try:
        text = head.decode("latin-1")
        request_line, *lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        raise _HttpError(400, "malformed request line", close=True) from None
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _HttpError(400, "malformed header line", close=True)
        headers[name.strip().lower()] = value.strip()
    return method.upper(), target, version, headers


def _keep_alive(version: str, headers: Mapping[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"
