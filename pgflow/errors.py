"""Exceptions raised by pgflow.

Every error a user can cause carries a one-line message that names the problem and,
where there is one, the fix. The CLI prints ``str(error)`` and exits non-zero.
"""

from __future__ import annotations

__all__ = [
    "BuildError",
    "ConfigError",
    "DatabaseUnavailable",
    "InvalidTransition",
    "NotFound",
    "PgflowError",
    "RunPaused",
    "SchemaError",
    "WorkerFailed",
    "WorkflowInProgress",
]


class PgflowError(Exception):
    """Base class of every error pgflow raises on purpose."""


class ConfigError(PgflowError):
    """Bad configuration: a malformed DSN, a missing setting, a bad option value."""


class DatabaseUnavailable(PgflowError):
    """The database could not be reached (server down, wrong host/port, auth failed)."""


class SchemaError(PgflowError):
    """The database schema does not match this code (not migrated, or newer than it)."""


class BuildError(PgflowError):
    """A workflow graph or its options are invalid; raised by ``Builder.build``."""


class NotFound(PgflowError):
    """No record matches the requested workflow / foreign id / run id."""


class WorkflowInProgress(PgflowError):
    """``trigger`` was called for a foreign id that already has an active run."""


class InvalidTransition(PgflowError):
    """A status change the workflow graph does not allow, or on a run that cannot move."""


class WorkerFailed(PgflowError):
    """A worker could not keep its consumers running (a task kept dying); it exits."""


class RunPaused(InvalidTransition):
    """A callback for a paused run: refused (not dropped); deliver it after ``resume``."""
