"""The JSON wire format shared by the webhook and broker connectors.

One event is one JSON object::

    {"id": "evt-1", "foreign_id": "order-42", "type": "payment.completed",
     "headers": {"amount": "120.50"}, "created_at": "2024-05-01T12:00:00Z"}

``foreign_id`` and ``type`` are required; ``id`` defaults to the transport's own
message id (broker sequence / offset / entry id), ``headers`` to ``{}``, ``created_at``
to the transport's timestamp or now. Header values must be strings; numbers and
booleans are accepted and turned into strings, anything else is rejected, because a
connector function that reads ``headers["amount"]`` must never meet a nested object.

Text that PostgreSQL cannot store is refused here, at the edge, with a reason: a NUL
character (``\u0000``: ``text`` and ``jsonb`` reject it), a lone UTF-16 surrogate
(``"\ud800"`` decodes to a Python string that has no UTF-8 form), a body that is not
UTF-8 (RFC 8259), and JSON nested deeper than :data:`MAX_DEPTH` levels. Letting such
an event through would fail the database write of every event batched with it.

Broker connectors accept a ``translator`` (:data:`Translator`) to map other formats;
a translator signals bad input by raising ``ValueError`` with a reason, which becomes
a :class:`~pgflow.connectors.MalformedEvent` (dead-lettered by the runner).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgflow.connectors._base import Ack, ConnectorEvent, MalformedEvent

__all__ = [
    "MAX_DEPTH",
    "RawMessage",
    "Translator",
    "event_from_json",
    "event_from_payload",
    "event_to_json",
    "json_translator",
    "payload_for_dead_letter",
    "translate",
]


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message as a transport delivered it, before translation."""

    body: bytes
    message_id: str  #: the transport's id (stream sequence, offset, entry id, ...)
    headers: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None


Translator = Callable[[RawMessage], ConnectorEvent]

#: Deepest JSON nesting accepted (an event needs 2: the object and its headers).
MAX_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def check_text(what: str, value: str) -> str:
    """``value`` unless PostgreSQL could not store it; ``ValueError`` says why."""
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains a lone UTF-16 surrogate") from None
    return value


def _check_depth(body: bytes) -> None:
    """Refuse JSON nested deeper than :data:`MAX_DEPTH` (before parsing it)."""
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return  # cannot be deeper: the common case costs two C-speed scans
    depth = 0
    for bracket in _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        depth += 1 if bracket in b"[{" else -1
        if depth > MAX_DEPTH:
            raise ValueError(f"body is nested deeper than {MAX_DEPTH} levels")


def _header_value(key: str, value: Any) -> str:
    if isinstance(value, str):
        return check_text(f"header {key!r}", value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise ValueError(
        f"header {key!r} must be a string, number or boolean, not {type(value).__name__}"
    )


def _text_field(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if value is None:
        raise ValueError(f"missing field {name!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"field {name!r} must be a non-empty string")
    return check_text(f"field {name!r}", value)


def event_from_payload(
    payload: Any, *, default_id: str | None = None, default_created_at: datetime | None = None
) -> ConnectorEvent:
    """Validate a decoded JSON value and build the event; ``ValueError`` says what is wrong."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"body must be a JSON object, not {type(payload).__name__}")
    foreign_id = _text_field(payload, "foreign_id")
    type_ = _text_field(payload, "type")
    if payload.get("id") is None:
        if default_id is None:
            raise ValueError("missing field 'id'")
        event_id = default_id
    else:
        event_id = _text_field(payload, "id")
    raw_headers = payload.get("headers") or {}
    if not isinstance(raw_headers, Mapping):
        raise ValueError("field 'headers' must be an object of strings")
    headers = {
        check_text("a header name", str(k)): _header_value(str(k), v)
        for k, v in raw_headers.items()
        if v is not None
    }
    created_at = default_created_at or datetime.now(UTC)
    if payload.get("created_at") is not None:
        try:
            created_at = datetime.fromisoformat(str(payload["created_at"]))
        except ValueError:
            raise ValueError("field 'created_at' must be an ISO 8601 timestamp") from None
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=UTC)
    return ConnectorEvent(event_id, foreign_id, type_, headers, created_at)


def event_from_json(
    body: bytes, *, default_id: str | None = None, default_created_at: datetime | None = None
) -> ConnectorEvent:
    """Decode one JSON event body (see the module doc); ``ValueError`` on bad input."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"body is not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    _check_depth(body)
    try:
        payload = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer of over 4300 digits
        raise ValueError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"body is nested deeper than {MAX_DEPTH} levels") from None
    return event_from_payload(payload, default_id=default_id, default_created_at=default_created_at)


def json_translator(message: RawMessage) -> ConnectorEvent:
    """The default broker translator: the body is the JSON event of the module doc."""
    return event_from_json(
        message.body, default_id=message.message_id, default_created_at=message.created_at
    )


def event_to_json(event: ConnectorEvent) -> bytes:
    """Encode ``event`` in the wire format (what the connectors' ``publish`` sends)."""
    return json.dumps(
        {
            "id": event.id,
            "foreign_id": event.foreign_id,
            "type": event.type,
            "headers": dict(event.headers),
            "created_at": event.created_at.isoformat(),
        },
        separators=(",", ":"),
    ).encode()


def payload_for_dead_letter(body: bytes) -> Any:
    """The raw body as something JSONB can store: parsed JSON, else the text, else hex."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    try:
        return {"text": body.decode()}
    except UnicodeDecodeError:
        return {"hex": body.hex()}


def translate(translator: Translator, message: RawMessage, ack: Ack) -> ConnectorEvent:
    """Run ``translator``; bad input becomes :class:`MalformedEvent` carrying ``ack``."""
    try:
        return translator(message)
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedEvent(
            str(exc),
            event_id=message.message_id,
            payload=payload_for_dead_letter(message.body),
            ack=ack,
        ) from exc
