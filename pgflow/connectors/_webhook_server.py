"""The webhook's standalone server: uvicorn with httptools (llhttp), inside the caller's loop.

Why these choices:

* **uvicorn**, the reference ASGI server, serves the ASGI app when the webhook is not
  mounted in an app of the user's; it runs as a task of the workflow's event loop, with
  its signal handlers left out (Ctrl-C belongs to the application).
* **httptools** (Node's llhttp) parses HTTP: it refuses a repeated ``Content-Length``
  outright (h11, uvicorn's other parser, silently merges identical ones) along with
  every other smuggling-prone framing. llhttp has no cap on the request head, so
  :class:`_Protocol` adds one: a head still unfinished after :data:`MAX_HEAD` bytes
  gets ``431`` (so a head costs at most that plus one socket read, 256 KiB). Its
  parse-error answer is JSON like the app's.
* ``limit_concurrency`` caps connections (and in-flight requests): past it, requests
  get uvicorn's ``503``, so a flood cannot exhaust memory or file descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["MAX_HEAD", "StandaloneServer"]

logger = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  #: bytes of request line + headers accepted


def _answer(transport: Any, status: str, reason: str) -> None:
    body = json.dumps({"error": reason}).encode()
    transport.write(
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )
    transport.close()


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head and JSON parse errors."""

    _head_bytes = 0
    _in_head = True

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still reading the head after this many bytes: it is too large (counting whole
        # reads over-counts only the read in which the head ended, which is not refused).
        if self._in_head and self._head_bytes > MAX_HEAD and not self.transport.is_closing():
            _answer(
                self.transport,
                "431 Request Header Fields Too Large",
                f"request head over {MAX_HEAD} bytes",
            )

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes = True, 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        del msg  # uvicorn's is generic; so is ours, but JSON like every other answer
        _answer(
            self.transport, "400 Bad Request", "malformed HTTP request (line, header or framing)"
        )


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handlers: the process belongs to the application."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or ``OSError`` naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelt out: asyncio sets TCP_NODELAY only on sockets that say so, and
    # accepted sockets inherit it; without it Nagle + delayed ACK add 40 ms per answer.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"webhook cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


class StandaloneServer:
    """Serves one ASGI app on ``host:port`` until :meth:`stop`."""

    def __init__(self, app: Any, *, name: str, max_connections: int) -> None:
        self.app = app
        self.name = name
        self.max_connections = max_connections
        self.port = 0
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen and serve; return the port (``port=0``: a free one)."""
        sock = _bind(host, port)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            interface="asgi3",
            http=_Protocol,
            lifespan="off",
            log_config=None,  # a library leaves logging configuration to the application
            access_log=False,
            server_header=False,
            limit_concurrency=self.max_connections,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=5,
        )
        server = _Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"pgflow-webhook-{self.name}")
        while not server.started:
            if task.done():
                sock.close()
                exc = task.exception() if not task.cancelled() else None
                raise OSError(f"webhook {self.name}: the server did not start ({exc!r})")
            await asyncio.sleep(0.01)
        self._server, self._task = server, task
        return self.port

    async def stop(self) -> None:
        """Stop accepting; answer in-flight requests (up to 5 s), then return."""
        server, task = self._server, self._task
        self._server, self._task = None, None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 10)
        except Exception:  # the server's own failure must not block the caller's stop
            logger.exception("webhook %s: server did not stop cleanly", self.name)
