"""Who may use the console, and the headers that keep a browser from being turned on it.

* **Access** — with a token (``pgflow ui --token`` / ``PGFLOW_UI_TOKEN``), every request
  (pages, static files, actions) must carry it: ``Authorization: Bearer <token>``, or
  the ``pgflow_ui_token`` cookie that opening any page once with ``?token=<token>`` sets
  (HttpOnly, SameSite=Strict; the redirect drops the token from the address bar). When
  the app is mounted in another application, an ``auth`` hook (``request -> bool``) can
  decide instead, e.g. from the host app's session. Comparisons are constant-time.
* **CSRF** — actions are POST only and carry a per-browser random token in a form field
  that must equal the ``pgflow_ui_csrf`` cookie (double submit; the cookie is
  SameSite=Strict, so a cross-site form cannot send it). A POST whose ``Origin`` is not
  this host is refused too.
* **Headers** — a CSP without any inline or eval'd script (htmx runs with ``allowEval``
  off), ``X-Frame-Options: DENY`` / ``frame-ancestors 'none'`` against clickjacking,
  ``nosniff``, ``same-origin`` referrers (a stricter ``no-referrer`` makes browsers send
  ``Origin: null`` on the console's own forms) and ``no-store``.
"""

from __future__ import annotations

import hmac
import inspect
import secrets
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AuthHook", "CSRF_COOKIE", "Guard", "TOKEN_COOKIE", "csrf_ok"]

TOKEN_COOKIE = "pgflow_ui_token"
CSRF_COOKIE = "pgflow_ui_csrf"
CSRF_FIELD = "csrf"

AuthHook = Callable[[Request], bool | Awaitable[bool]]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def _same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


class Guard:
    """ASGI middleware: authenticate every request, hand out the CSRF cookie, add the
    security headers to every response (including refusals)."""

    def __init__(self, app: ASGIApp, *, token: str | None, auth: AuthHook | None) -> None:
        self.app = app
        self.token = token or None
        self.auth = auth

    async def _allowed(self, request: Request) -> bool:
        if self.token is not None:
            header = request.headers.get("authorization", "")
            bearer = header[7:] if header.lower().startswith("bearer ") else None
            if not (
                _same(bearer, self.token) or _same(request.cookies.get(TOKEN_COOKIE), self.token)
            ):
                return False
        if self.auth is not None:
            verdict = self.auth(request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            if not verdict:
                return False
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        csrf = request.cookies.get(CSRF_COOKIE) or ""
        new_csrf = not (16 <= len(csrf) <= 128)
        if new_csrf:
            csrf = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf"] = csrf
        cookie_path = (scope.get("root_path") or "") + "/"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                if new_csrf:
                    cookie = SimpleCookie()
                    cookie[CSRF_COOKIE] = csrf
                    cookie[CSRF_COOKIE]["path"] = cookie_path
                    cookie[CSRF_COOKIE]["samesite"] = "Strict"
                    cookie[CSRF_COOKIE]["secure"] = request.url.scheme == "https"
                    cookie[CSRF_COOKIE]["httponly"] = True
                    headers.append((b"set-cookie", cookie.output(header="").strip().encode()))
                message = {**message, "headers": headers}
            await send(message)

        given = request.query_params.get("token")
        if self.token is not None and given is not None and request.method == "GET":
            response = self._login(request, given, cookie_path)
            await response(scope, receive, send_with_headers)
            return
        if not await self._allowed(request):
            refusal = PlainTextResponse(
                "pgflow ui: not authorised (open the console with ?token=... or send "
                "Authorization: Bearer ...)\n",
                status_code=401,
            )
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _login(self, request: Request, given: str, cookie_path: str) -> Response:
        """``?token=`` on a GET: set the cookie and redirect to the same URL without it."""
        assert self.token is not None
        if not _same(given, self.token):
            return PlainTextResponse("pgflow ui: wrong token\n", status_code=401)
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        url = URL(scope=request.scope).replace(query=urlencode(rest))
        target = url.path + (f"?{url.query}" if url.query else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            TOKEN_COOKIE,
            self.token,
            path=cookie_path,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",  # behind a TLS proxy
        )
        return response


def csrf_ok(request: Request, form: Any) -> bool:
    """Whether a POST carries this browser's CSRF token and comes from this origin."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            return False
    elif origin == "null":
        return False
    given = form.get(CSRF_FIELD) if form is not None else None
    given = given or request.headers.get("x-csrf-token")
    return _same(request.cookies.get(CSRF_COOKIE), given if isinstance(given, str) else None)
