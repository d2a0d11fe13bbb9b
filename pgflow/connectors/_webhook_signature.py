"""Webhook signatures with a timestamp, as Stripe signs its webhooks.

The sender puts ``X-Pgflow-Signature: t=<unix seconds>,v1=<hex>`` on each post, where
``<hex>`` is HMAC-SHA256, keyed with the shared secret, of ``"<t>." + raw body``. The
receiver recomputes it and also checks ``t`` against a tolerance window (default five
minutes, either way): a captured request replayed later than that is refused even
though its signature is genuine. Inside the window, replays are caught by event id
(``pgflow.webhook_seen``, see :mod:`pgflow.connectors.webhook`).

Several ``v1=`` entries may be sent (signed with the old and the new secret while one
is rotated), and the receiver may hold several secrets: any match passes. Unknown
schemes (``v0=``…) are ignored, so a sender can add a newer scheme without breaking an
older receiver. A plain ``sha256=<hex>`` (pgflow 0.1) carries no timestamp and is
refused with a reason.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

from pgflow.errors import SignatureError

__all__ = ["DEFAULT_TOLERANCE", "SIGNATURE_HEADER", "SignatureError", "sign", "verify"]

SIGNATURE_HEADER = "X-Pgflow-Signature"
DEFAULT_TOLERANCE = 300.0  #: seconds a signature's timestamp may be off from now
_FORMAT = "expected t=<unix time>,v1=<hex HMAC-SHA256 of '<t>.' + body>"


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _mac(key: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(key, b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def sign(secret: str | bytes, body: bytes, timestamp: float | None = None) -> str:
    """The signature header value for ``body``: ``t=<now>,v1=<hex>``."""
    t = int(time.time() if timestamp is None else timestamp)
    return f"t={t},v1={_mac(_key(secret), t, body)}"


def verify(
    secrets: Sequence[bytes],
    header: str | None,
    body: bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> str:
    """Check ``header`` for ``body``; return the matching ``v1`` value (a replay key).

    Raises :class:`SignatureError` with the reason otherwise.
    """
    if not header:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header ({_FORMAT})")
    timestamps: list[str] = []
    macs: list[str] = []
    for item in header.split(","):
        scheme, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError(f"malformed {SIGNATURE_HEADER} header: {_FORMAT}")
        if scheme == "t":
            timestamps.append(value)
        elif scheme == "v1":
            macs.append(value.lower())
        elif scheme == "sha256" and len(timestamps) == 0:
            raise SignatureError(
                f"{SIGNATURE_HEADER} has no timestamp: {_FORMAT} (webhook.sign() makes one)"
            )
    if len(timestamps) != 1 or not (timestamps[0].isascii() and timestamps[0].isdigit()):
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: {_FORMAT}")
    if not macs:
        raise SignatureError(f"{SIGNATURE_HEADER} has no v1 signature: {_FORMAT}")
    if len(timestamps[0]) > 15:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header: t is not a unix time")
    timestamp = int(timestamps[0])
    for key in secrets:
        expected = _mac(key, timestamp, body)
        for given in macs:
            if hmac.compare_digest(given.encode(), expected.encode()):
                age = (time.time() if now is None else now) - timestamp
                if abs(age) > tolerance:
                    raise SignatureError(
                        f"signature timestamp is {age:+.0f} s from now, outside the"
                        f" {tolerance:.0f} s tolerance (a replay, or a wrong clock)"
                    )
                return expected
    raise SignatureError("bad signature")
