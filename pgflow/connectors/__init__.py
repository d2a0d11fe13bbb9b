"""Connectors: bring events from outside sources into workflows.

Shipped connectors live in submodules (``memory``, ``table``, ``webhook``, and the
broker extras ``nats``, ``rabbitmq``, ``redis``, ``kafka``); each exposes a class named
``Connector``.
"""

from __future__ import annotations

from pgflow.connectors._base import (
    Ack,
    Connector,
    ConnectorConsumer,
    ConnectorEvent,
    ConnectorFunc,
    MalformedEvent,
    Reject,
    TransactionalConsumer,
)

__all__ = [
    "Ack",
    "Connector",
    "ConnectorConsumer",
    "ConnectorEvent",
    "ConnectorFunc",
    "MalformedEvent",
    "Reject",
    "TransactionalConsumer",
]
