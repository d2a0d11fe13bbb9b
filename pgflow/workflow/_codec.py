"""Turning run objects and statuses into what the database stores, and back.

A run's object ``T`` is a dataclass, a pydantic model or a plain dict (anything JSON
shaped works too); it is stored as JSONB so humans can query it. Statuses are members
of an ``IntEnum``/``StrEnum``; the member NAME is stored (in ``records.status`` and
``events.type``) because names survive renumbering and read well in SQL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import json
import re
import types
import typing
import uuid
from decimal import Decimal
from typing import Any, Generic, TypeVar

__all__ = ["ObjectCodec", "StatusCodec", "to_jsonable"]

T = TypeVar("T")
S = TypeVar("S", bound=enum.Enum)


def to_jsonable(value: Any) -> Any:
    """A JSON-serialisable view of ``value`` (dataclasses, pydantic, enums, dates...)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump):  # pydantic v2
        return dump(mode="json")
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot store a {type(value).__name__} in a run object (not JSON-able)")


@functools.lru_cache(maxsize=512)
def _hints(tp: type) -> dict[str, Any]:
    return typing.get_type_hints(tp)


def _convert(tp: Any, data: Any) -> Any:
    """Best-effort rebuild of a typed value from JSON data (nested dataclasses etc.)."""
    if data is None or tp is Any:
        return data
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(members[0], data) if len(members) == 1 else data
    if origin in (list, set, frozenset, tuple) and isinstance(data, list):
        params = typing.get_args(tp)
        item = params[0] if params else Any
        items = [_convert(item, v) for v in data]
        return items if origin is list else origin(items)
    if origin is dict and isinstance(data, dict):
        kv = typing.get_args(tp)
        return {k: _convert(kv[1] if kv else Any, v) for k, v in data.items()}
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp) and isinstance(data, dict):
            hints = _hints(tp)
            kwargs = {
                f.name: _convert(hints.get(f.name, Any), data[f.name])
                for f in dataclasses.fields(tp)
                if f.init and f.name in data
            }
            return tp(**kwargs)
        validate = getattr(tp, "model_validate", None)
        if callable(validate):
            return validate(data)
        if issubclass(tp, enum.Enum):
            return tp(data)
        if tp is dt.datetime and isinstance(data, str):
            return dt.datetime.fromisoformat(data)
        if tp is dt.date and isinstance(data, str):
            return dt.date.fromisoformat(data)
        if tp in (uuid.UUID, Decimal) and isinstance(data, str):
            return tp(data)
        if tp is dt.timedelta and isinstance(data, int | float):
            return dt.timedelta(seconds=data)
    return data


#: ``\u0000`` as a JSON escape (not preceded by an escaped backslash): jsonb refuses it
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class ObjectCodec(Generic[T]):
    """Serialises run objects of type ``T`` to JSON text and back."""

    def __init__(self, type_: Any) -> None:
        self.type = type_

    def dump(self, value: T | None) -> str | None:
        """JSON text for the ``object`` column (None stays SQL NULL).

        Raises ValueError/TypeError for what PostgreSQL's jsonb would refuse later
        (NaN and infinities, the NUL character) so that the error belongs to the one
        run whose object it is, not to the statement that writes a whole batch.
        """
        if value is None:
            return None
        try:
            text = json.dumps(to_jsonable(value), separators=(",", ":"), allow_nan=False)
        except ValueError as exc:
            if "float" not in str(exc):
                raise
            raise ValueError("cannot store NaN or infinity in a run object (not JSON)") from None
        if "\\u0000" in text and _NUL_ESCAPE.search(text):
            raise ValueError("cannot store the NUL character (\\x00) in a run object")
        return text

    def load(self, data: Any) -> T:
        """Rebuild a ``T`` from the JSONB value psycopg returned (already parsed)."""
        if self.type is dict and isinstance(data, dict):
            return typing.cast(T, data)
        return typing.cast(T, _convert(self.type, data))

    def default(self) -> T | None:
        """The object of a run triggered without ``initial``: ``T()`` when that works."""
        if self.type is dict or typing.get_origin(self.type) is dict:
            return typing.cast(T, {})
        try:
            return typing.cast(T, self.type())
        except Exception:
            return None


class StatusCodec(Generic[S]):
    """Maps status members to their stored names and back, with clear errors."""

    def __init__(self, enum_type: type[S]) -> None:
        self.enum = enum_type
        self._by_name: dict[str, S] = {m.name: m for m in enum_type}

    def name(self, status: Any) -> str:
        """The stored name of ``status`` (a member, or a value/name that maps to one)."""
        return self.coerce(status).name

    def coerce(self, status: Any) -> S:
        """``status`` as a member of the enum; raises ValueError for anything else."""
        if isinstance(status, self.enum):
            return status
        if isinstance(status, enum.Enum):
            raise ValueError(
                f"{status!r} is not a {self.enum.__name__} (it is a {type(status).__name__})"
            )
        if isinstance(status, str) and status in self._by_name:
            return self._by_name[status]
        try:
            return self.enum(status)
        except ValueError:
            raise ValueError(f"{status!r} is not a {self.enum.__name__}") from None

    def load(self, name: str) -> S:
        member = self._by_name.get(name)
        if member is None:
            raise ValueError(f"stored status {name!r} is not a {self.enum.__name__} member")
        return member
