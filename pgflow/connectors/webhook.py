"""A webhook connector: an HTTP endpoint that turns signed JSON posts into events.

Usage::

    from pgflow.connectors import webhook
    hook = webhook.Connector(dsn, "payments", port=8080, secret=os.environ["HOOK_SECRET"])
    builder.add_connector("payments", hook, handle_payment)
    # POST http://host:8080/  {"id": "evt-1", "foreign_id": "order-1",
    #                          "type": "payment.completed", "headers": {"amount": "12"}}
    # X-Pgflow-Signature: t=<unix time>,v1=<hex HMAC>     (webhook.sign() makes it)

or, inside your own ASGI app (Starlette, FastAPI, ...), at a path of your choice::

    hook = webhook.Connector(dsn, "payments", port=None, secret=...)   # no own server
    app.mount("/hooks/payments", hook.app)          # POST /hooks/payments/
    # or: Route("/hooks/payments", hook.app)        # POST /hooks/payments

``hook.app`` is a plain ASGI application (:class:`~pgflow.connectors._webhook_app.
WebhookApp`, built on Starlette); standalone, ``start()`` serves it with uvicorn on
``host:port`` (``port=0``: a free port; ``hook.url`` says where). HTTP itself (parsing,
keep-alive, chunked bodies, malformed or smuggling-prone framing) is the server's job:
a hand-written parser was the source of every crash in issue 10.

Durability first. A post is answered ``200`` only after its event is committed to
``pgflow.events`` (stream ``"webhook:<name>"``): concurrent posts are group-committed
(:mod:`~pgflow.connectors._group_commit`), one transaction per batch, each post
isolated from the others' bad values. The workflow side consumes that stream by
cursor exactly like the table connector (:class:`~pgflow.connectors.
TransactionalConsumer`: the cursor advances in the same transaction as the connector
function's effects), so an accepted post triggers its workflow exactly once, and a
sender that got no ``200`` (crash, ``503``) can retry.

Replays. With ``secret``, a signature carries its timestamp and is refused outside
``tolerance`` seconds (:mod:`~pgflow.connectors._webhook_signature`). Inside the
window, an event id seen before (``pgflow.webhook_seen``) is answered ``200`` with
``"duplicate": true`` and the first post's position, and not stored again.

Put TLS and public exposure behind a reverse proxy (or your ASGI server's TLS).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the webhook connector needs Starlette and uvicorn: pip install 'pgflow-engine[webhook]'"
    ) from exc

from pgflow.connectors._base import ConnectorEvent
from pgflow.connectors._group_commit import GroupCommit
from pgflow.connectors._webhook_app import ID_HEADER, WebhookApp
from pgflow.connectors._webhook_server import StandaloneServer
from pgflow.connectors._webhook_signature import (
    DEFAULT_TOLERANCE,
    SIGNATURE_HEADER,
    SignatureError,
    sign,
    verify,
)
from pgflow.connectors.table import Connector as TableConnector
from pgflow.connectors.table import CursorStore, Row, TableConsumer
from pgflow.errors import ConfigError
from pgflow.log.snapshots import Position
from pgflow.log.streamer import Filter, read_batch

__all__ = [
    "DEFAULT_TOLERANCE",
    "Connector",
    "EventLogStream",
    "SIGNATURE_HEADER",
    "SignatureError",
    "WebhookApp",
    "sign",
    "verify",
]

logger = logging.getLogger(__name__)


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
        batch = await read_batch(conn, self.filter, after, limit)
        if not batch.events:
            return []  # (a batch that only leaves an exhausted diff: nothing to hand out)
        return [
            (
                position,
                {
                    "id": e.id,
                    "foreign_id": e.foreign_id,
                    "type": e.type,
                    "headers": e.headers,
                    "created_at": e.created_at,
                },
            )
            for e, position in zip(batch.events, batch.positions, strict=True)
        ]


def _stored_event(row: Row) -> ConnectorEvent:
    headers = dict(row["headers"])
    event_id = headers.pop(ID_HEADER, None) or f"webhook-{row['id']}"
    created = row["created_at"]
    assert isinstance(created, datetime)
    return ConnectorEvent(event_id, row["foreign_id"], row["type"], headers, created)


class Connector:
    """An HTTP endpoint writing events to ``pgflow.events`` and a cursor consumer of them.

    ``db`` is the workflow's database (DSN or pool). ``app`` is the ASGI application to
    mount in your own app; with ``port`` set (``0``: any free port) ``start()`` (or
    ``async with``, or the first ``make()``) also serves it on ``host:port`` with
    uvicorn, ``path`` being its one path. ``port=None``: no server of its own.
    """

    def __init__(
        self,
        db: str | AsyncConnectionPool[Any],
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = 0,
        path: str = "/",
        secret: str | bytes | Sequence[str | bytes] | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        max_body: int = 1 << 20,
        request_timeout: float = 30.0,
        max_connections: int = 1000,
        poll_interval: float = 0.5,
        batch_size: int = 100,
    ) -> None:
        if not name:
            raise ValueError("webhook connector needs a name")
        if max_body < 1:
            raise ValueError("max_body must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be positive")
        if tolerance <= 0:
            raise ValueError("tolerance must be positive (seconds)")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        self.name = name
        self.stream = f"webhook:{name}"
        self.host = host
        self.port = port
        self.path = path
        self.max_connections = max_connections
        if secret is None:
            secrets: list[bytes] = []
        elif isinstance(secret, str | bytes):
            secrets = [secret.encode() if isinstance(secret, str) else secret]
        else:
            secrets = [s.encode() if isinstance(s, str) else s for s in secret]
        if secret is not None and not all(secrets):
            raise ValueError("webhook secret must not be empty")
        self.store = CursorStore(db, pool_size=4)
        self.reader = TableConnector(
            EventLogStream(self.stream),
            self.store,
            _stored_event,
            batch_size=batch_size,
            poll_interval=poll_interval,
            cursor_stream=self.stream,
        )
        self._ingest = GroupCommit(self.store, self.stream)
        self._ingest.on_commit.append(self.reader.wake)
        #: the ASGI application (mount it, or let ``start()`` serve it)
        self.app = WebhookApp(
            self._ingest,
            secrets=secrets,
            tolerance=tolerance,
            max_body=max_body,
            request_timeout=request_timeout,
        )
        self.app.on_shutdown.append(self.stop)
        self._server: StandaloneServer | None = None
        self._start_lock = asyncio.Lock()
        self._consumers = 0
        self._auto_started = False

    @property
    def accepted(self) -> int:
        """Events made durable (for tests and metrics)."""
        return self.app.accepted

    @property
    def rejected(self) -> int:
        """Requests answered with an error."""
        return self.app.rejected

    @property
    def url(self) -> str:
        """Where the standalone server listens (after ``start()``; not with ``port=None``)."""
        return f"http://{self.host}:{self.port}{self.path}"

    async def start(self) -> None:
        """Serve ``app`` on ``host:port`` (nothing to do with ``port=None``)."""
        async with self._start_lock:
            if self._server is not None or self.port is None:
                return
            server = StandaloneServer(
                functools.partial(self.app.serve, path=self.path),
                name=self.name,
                max_connections=self.max_connections,
            )
            try:
                self.port = await server.start(self.host, self.port)
            except OSError as exc:
                raise ConfigError(
                    f"webhook {self.name!r}: cannot listen on {self.host}:{self.port}:"
                    f" {os.strerror(exc.errno) if exc.errno else exc}"
                    " (is another process using the port?)"
                ) from None
            self._server = server
            logger.info("webhook %s listening on %s", self.name, self.url)

    async def stop(self) -> None:
        """Stop serving (in-flight posts are answered first), then release the pool."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
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
        if self._server is None and self.port is not None:
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
