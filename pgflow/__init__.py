"""pgflow: durable workflows and change data capture on PostgreSQL alone.

The public API is re-exported here; modules whose names start with ``_`` are private.
"""

from __future__ import annotations

from . import timers
from .api import API, run_id_for
from .builder import Builder
from .capture import capture, uncapture
from .connectors import Connector, ConnectorConsumer, ConnectorEvent
from .cursors import Consumer, CursorKey
from .errors import (
    BuildError,
    ConfigError,
    DatabaseUnavailable,
    InvalidTransition,
    NotFound,
    PgflowError,
    RunPaused,
    SchemaError,
    WorkerFailed,
    WorkflowInProgress,
)
from .events import Event, NewEvent, Position
from .graph import Graph
from .listing import Page
from .migrations import migrate
from .records import Record, RunState
from .run import Run
from .streamer import Filter, Listener, Notifier, stream
from .workflow import ConsumerState, Workflow

__version__ = "0.1.0"

__all__ = [
    "API",
    "BuildError",
    "Builder",
    "ConfigError",
    "Connector",
    "ConnectorConsumer",
    "ConnectorEvent",
    "ConsumerState",
    "Consumer",
    "CursorKey",
    "DatabaseUnavailable",
    "Event",
    "Filter",
    "Graph",
    "InvalidTransition",
    "Listener",
    "NewEvent",
    "Notifier",
    "NotFound",
    "Page",
    "PgflowError",
    "Position",
    "Record",
    "Run",
    "RunState",
    "SchemaError",
    "Workflow",
    "RunPaused",
    "WorkerFailed",
    "WorkflowInProgress",
    "capture",
    "migrate",
    "run_id_for",
    "stream",
    "timers",
    "uncapture",
]
