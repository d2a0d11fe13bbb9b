"""pgflow: durable workflows and change data capture on PostgreSQL alone.

The public API is re-exported here; modules whose names start with ``_`` are private.
"""

from __future__ import annotations

from .errors import (
    BuildError,
    ConfigError,
    DatabaseUnavailable,
    InvalidTransition,
    NotFound,
    PgflowError,
    SchemaError,
    WorkflowInProgress,
)
from .events import Event, NewEvent, Position
from .migrations import migrate
from .streamer import Filter, Listener, Notifier

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "ConfigError",
    "DatabaseUnavailable",
    "Event",
    "Filter",
    "InvalidTransition",
    "Listener",
    "NewEvent",
    "Notifier",
    "NotFound",
    "PgflowError",
    "Position",
    "SchemaError",
    "WorkflowInProgress",
    "migrate",
]
