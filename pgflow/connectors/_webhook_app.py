"""The webhook's ASGI application: one signed JSON post in, one durable event out.

An ordinary ASGI app (Starlette's request and response types), so it runs wherever
ASGI runs: standalone under uvicorn (:meth:`pgflow.connectors.webhook.Connector.start`)
or mounted into a user's Starlette/FastAPI app at a path of their choice. HTTP framing
(request lines, header syntax, chunked bodies, keep-alive) is the server's job; this
app judges the request that framing produced.

Every request gets an answer, and every refusal says why, as ``{"error": reason}``:
the order of the checks below is the order of the status codes in the docs. Nothing
here trusts the client to be well-behaved: the body is read against a byte cap and a
deadline, duplicate or contradictory framing headers are refused, and an unexpected
exception still gets a ``500`` with its type (and a log line), never a dropped
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from pgflow.connectors._codec import event_from_json
from pgflow.connectors._group_commit import GroupCommit, Rejected, Unavailable
from pgflow.connectors._webhook_signature import SIGNATURE_HEADER, SignatureError, verify
from pgflow.log.events import NewEvent

__all__ = ["ID_HEADER", "WebhookApp"]

logger = logging.getLogger(__name__)

ID_HEADER = "pgflow.webhook.id"  #: the sender's event id, kept on the stored event
DRAIN_LIMIT = 1 << 20  #: bytes of a refused body read (and dropped) before answering


class _Answer(JSONResponse):
    """A JSON response with ASCII-only output (a reason may quote hostile text)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class _Refused(Exception):
    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


def _declared(scope: Scope) -> int:
    """The Content-Length of the request (0 if absent or unreadable)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() and len(value) < 19 else 0
    return 0


class WebhookApp:
    """ASGI app: every HTTP request that reaches it is a post to the webhook.

    Where it listens is the mounting's business (a route, a ``Mount``, or the
    standalone server's one path). Lifespan ``shutdown`` (when it is the top-level app)
    runs ``on_shutdown``.
    """

    def __init__(
        self,
        ingest: GroupCommit,
        *,
        secrets: Sequence[bytes] = (),
        tolerance: float,
        max_body: int,
        request_timeout: float,
    ) -> None:
        self.ingest = ingest
        self.secrets = list(secrets)
        self.tolerance = tolerance
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.on_shutdown: list[Any] = []  #: async callables
        self.accepted = 0  #: events made durable
        self.duplicates = 0  #: posts of an event id stored before (answered 200)
        self.rejected = 0  #: requests answered with an error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.serve(scope, receive, send)

    async def serve(
        self, scope: Scope, receive: Receive, send: Send, *, path: str | None = None
    ) -> None:
        """The ASGI entry point; with ``path``, requests for another path get ``404``."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1003})
            return
        if scope["type"] != "http":
            return
        body_done = False

        async def tracked() -> Message:
            nonlocal body_done
            message = await receive()
            body_done = body_done or not message.get("more_body", False)
            return message

        try:
            status, body, headers = await self._handle(Request(scope, tracked), path)
        except _Refused as refused:
            status, body, headers = refused.status, {"error": refused.reason}, refused.headers
            if not body_done and status != 408 and _declared(scope) <= DRAIN_LIMIT:
                await self._drain(tracked)
        except ClientDisconnect:
            return  # nobody to answer
        except Exception as exc:
            logger.exception("webhook: unexpected error")
            status, body, headers = 500, {"error": f"internal error ({type(exc).__name__})"}, {}
        if status >= 400:
            self.rejected += 1
        await _Answer(body, status, headers)(scope, receive, send)

    async def _drain(self, receive: Receive) -> None:
        """Read and drop the rest of a refused body (up to :data:`DRAIN_LIMIT` bytes).

        Only for a body declared no larger than that (or chunked): a bigger one is
        refused at once, unread.

        A server that closes with unread bytes makes the kernel send a TCP reset, which
        can destroy the answer before the client reads it: refusing without draining
        would look, to the sender, like a dropped connection.
        """
        drained = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.request_timeout):
                while drained <= DRAIN_LIMIT:
                    message = await receive()
                    drained += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for callback in self.on_shutdown:
                    await callback()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(
        self, request: Request, path: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if path is not None and request.scope["path"] != path:
            raise _Refused(404, f"no webhook at {request.scope['path']}; post to {path}")
        if request.method != "POST":
            raise _Refused(405, "use POST", {"Allow": "POST"})
        body = await self._read_body(request)
        signature_key: str | None = None
        if self.secrets:
            signatures = request.headers.getlist(SIGNATURE_HEADER)
            if len(signatures) > 1:
                raise _Refused(401, f"more than one {SIGNATURE_HEADER} header")
            try:
                signature_key = verify(
                    self.secrets,
                    signatures[0] if signatures else None,
                    body,
                    tolerance=self.tolerance,
                )
            except SignatureError as exc:
                raise _Refused(401, str(exc)) from None
        try:
            event = event_from_json(body, default_id="")
        except ValueError as exc:
            raise _Refused(400, str(exc)) from None
        if any(name.startswith("pgflow.") for name in event.headers):
            raise _Refused(400, "header names starting with 'pgflow.' are reserved")
        headers = dict(event.headers)
        if event.id:
            headers[ID_HEADER] = event.id
        # A replay is known by its id; an id-less signed post by its signature (a replay
        # of the very same request inside the tolerance window). Unsigned, id-less
        # posts cannot be told apart from new ones.
        key = event.id or (f"v1:{signature_key}" if signature_key else None)
        try:
            stored = await self.ingest.submit(
                NewEvent(self.ingest.stream, event.type, event.foreign_id, headers=headers), key
            )
        except Unavailable as exc:
            raise _Refused(503, f"event not stored ({exc}); retry", {"Retry-After": "1"}) from None
        except Rejected as exc:
            raise _Refused(400, f"event refused by the database: {exc}") from None
        answer: dict[str, Any] = {
            "id": event.id or f"webhook-{stored.position}",
            "position": stored.position,
        }
        if stored.duplicate:
            self.duplicates += 1
            answer["duplicate"] = True
        else:
            self.accepted += 1
        return 200, answer, {}

    async def _read_body(self, request: Request) -> bytes:
        """The whole body, within ``max_body`` bytes and ``request_timeout`` seconds."""
        lengths = request.headers.getlist("content-length")
        if len(lengths) > 1:
            raise _Refused(400, "more than one Content-Length header")
        if lengths and request.headers.getlist("transfer-encoding"):
            raise _Refused(400, "both Content-Length and Transfer-Encoding")
        if lengths:
            text = lengths[0].strip()
            if not (text.isascii() and text.isdigit()):
                raise _Refused(400, "bad Content-Length")
            if int(text) > self.max_body:
                raise _Refused(
                    413, f"body of {int(text)} bytes exceeds the {self.max_body}-byte limit"
                )
        body = bytearray()
        try:
            async with asyncio.timeout(self.request_timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > self.max_body:
                        raise _Refused(413, f"body exceeds the {self.max_body}-byte limit")
        except TimeoutError:
            raise _Refused(408, f"body not received within {self.request_timeout:g} s") from None
        return bytes(body)
