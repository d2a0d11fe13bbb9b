"""Targets for ``pgflow worker`` that are not workflows (tests/test_cli_faults.py)."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any

import pgflow
from pgflow.connectors import webhook

CALLS: list[str] = []


class Status(enum.IntEnum):
    START = 1
    END = 2


@dataclass
class Order:
    id: str = ""


def side_effect() -> int:
    CALLS.append("side_effect")
    return 1


def needs_args(dsn: str) -> pgflow.Builder[Any, Status]:
    CALLS.append("needs_args")
    raise AssertionError("never called")


def webhook_workflow() -> pgflow.Builder[dict[str, Any], Status]:
    dsn = os.environ["FAULTY_DSN"]
    port = int(os.environ["FAULTY_WEBHOOK_PORT"])
    b = pgflow.Builder("faulty-hooks", dict, Status)
    b.add_step(Status.START, lambda run: Status.END, Status.END)
    hook = webhook.Connector(dsn, "hooks", host="127.0.0.1", port=port)

    async def on_post(api: Any, event: Any) -> None:
        await api.trigger(event.foreign_id)

    b.add_connector("hooks", hook, on_post)
    return b
