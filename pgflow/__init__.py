"""pgflow: durable workflows and change data capture on PostgreSQL alone.

The public API is re-exported here; modules whose names start with ``_`` are private.
"""

from __future__ import annotations

from pgflow import _moved
from pgflow._version import __version__
from pgflow.connectors import Connector, ConnectorConsumer, ConnectorEvent
from pgflow.connectors.capture import capture, uncapture
from pgflow.errors import (
    BuildError,
    ConfigError,
    DatabaseUnavailable,
    InspectError,
    InspectFailed,
    InspectRefused,
    InvalidTransition,
    LostCursor,
    MalformedEvent,
    NotFound,
    PgflowError,
    Reject,
    ReplayFailed,
    RunPaused,
    SchemaError,
    SignatureError,
    WorkerFailed,
    WorkflowInProgress,
)
from pgflow.log.cursors import Consumer, CursorKey
from pgflow.log.events import Event, NewEvent, Position
from pgflow.log.listener import Listener, Notifier
from pgflow.log.streamer import Filter, stream
from pgflow.ops.migrations import migrate
from pgflow.workflow import timers
from pgflow.workflow.api import API, run_id_for
from pgflow.workflow.builder import Builder
from pgflow.workflow.graph import Graph
from pgflow.workflow.listing import Page
from pgflow.workflow.records import Record, RunState
from pgflow.workflow.run import Run
from pgflow.workflow.workflow import ConsumerState, Workflow

__all__ = [
    "API",
    "BuildError",
    "Builder",
    "ConfigError",
    "Connector",
    "ConnectorConsumer",
    "ConnectorEvent",
    "Consumer",
    "ConsumerState",
    "CursorKey",
    "DatabaseUnavailable",
    "Event",
    "Filter",
    "Graph",
    "InspectError",
    "InspectFailed",
    "InspectRefused",
    "InvalidTransition",
    "Listener",
    "LostCursor",
    "MalformedEvent",
    "NewEvent",
    "NotFound",
    "Notifier",
    "Page",
    "PgflowError",
    "Position",
    "Record",
    "Reject",
    "ReplayFailed",
    "Run",
    "RunPaused",
    "RunState",
    "SchemaError",
    "SignatureError",
    "WorkerFailed",
    "Workflow",
    "WorkflowInProgress",
    "__version__",
    "capture",
    "migrate",
    "run_id_for",
    "stream",
    "timers",
    "uncapture",
]

_moved.install()
