"""Exceptions raised by pgflow, all in one place.

Every error a user can cause carries a one-line message that names the problem and,
where there is one, the fix. The CLI prints ``str(error)`` and exits non-zero. Errors
about a run also carry what the message says as attributes (``NotFound.foreign_id``,
``InvalidTransition.to_status``, ...), so code need not parse messages; an attribute
is ``None`` where the raise site did not know it.

The classes (``tests/test_public_api.py`` checks this tree against the real ones; a
name's parent is the line above it indented one step less, ``also`` lists further
bases; the private ``_AboutARun``, which holds the run attributes, is left out)::

    PgflowError
        ConfigError (also ValueError)
        DatabaseUnavailable
        SchemaError
        BuildError
        NotFound
        WorkflowInProgress
        InvalidTransition
            RunPaused
        WorkerFailed
        ReplayFailed
        LostCursor
        MalformedEvent
        SignatureError (also ValueError)
        InspectError
            InspectRefused
            InspectFailed
    Reject

``ConfigError`` and ``SignatureError`` are ``ValueError`` as well because they were
plain ``ValueError`` before: code catching that keeps working. :class:`Reject` is not
a ``PgflowError``: your connector function raises it, not pgflow, and pgflow code that
passes its own errors through (``except PgflowError: raise``) must not mistake it for
one of them.

Some modules re-export the classes they raise (``pgflow.ops.inspect.InspectFailed``,
``pgflow.connectors.Reject``, ...): the same class objects, older import paths.
Control-flow signals that are not errors stay in their modules:
:class:`~pgflow.log.cursors.RetryBatchNow`, ``NeedsPerEventPath`` and the private
ones (``_Stale``, ``_Void``, ...).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Any, TypedDict, Unpack

__all__ = [
    "BuildError",
    "ConfigError",
    "DatabaseUnavailable",
    "InspectError",
    "InspectFailed",
    "InspectRefused",
    "InvalidTransition",
    "LostCursor",
    "MalformedEvent",
    "NotFound",
    "PgflowError",
    "Reject",
    "ReplayFailed",
    "RunPaused",
    "SchemaError",
    "SignatureError",
    "WorkerFailed",
    "WorkflowInProgress",
]


class PgflowError(Exception):
    """Base class of every error pgflow raises on purpose."""


class ConfigError(PgflowError, ValueError):
    """Bad configuration or argument: a malformed DSN, a missing setting, a bad option
    value. A ``ValueError`` too (these were plain ``ValueError`` once)."""


class DatabaseUnavailable(PgflowError):
    """The database could not be reached (server down, wrong host/port, auth failed)."""


class SchemaError(PgflowError):
    """The database schema does not match this code (not migrated, or newer than it)."""


class BuildError(PgflowError):
    """A workflow graph or its options are invalid; raised by ``Builder.build``.

    ``problems``: every problem found (the message joins them), not only the first.
    """

    def __init__(
        self, message: str, *, workflow: str | None = None, problems: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.workflow = workflow
        self.problems = tuple(problems)


class _Run(TypedDict, total=False):
    """The keywords of :class:`_AboutARun`, for the subclasses that add their own."""

    workflow: str | None
    foreign_id: str | None
    run_id: object


class _AboutARun(PgflowError):
    """Shared by the errors about one run: which workflow, foreign id and run id."""

    def __init__(
        self,
        message: str,
        *,
        workflow: str | None = None,
        foreign_id: str | None = None,
        run_id: object = None,
    ) -> None:
        super().__init__(message)
        self.workflow = workflow
        self.foreign_id = foreign_id
        #: as a string, the form ``trigger`` returns and ``Record.run_id`` holds
        self.run_id = None if run_id is None else str(run_id)


class NotFound(_AboutARun):
    """No record matches the requested workflow / foreign id / run id (the attributes
    say which were asked for); ``dead_letter_id`` for a dead letter that is not there."""

    def __init__(
        self, message: str, *, dead_letter_id: int | None = None, **run: Unpack[_Run]
    ) -> None:
        super().__init__(message, **run)
        self.dead_letter_id = dead_letter_id


class WorkflowInProgress(_AboutARun):
    """``trigger`` was called for a foreign id that already has an active run.

    ``run_id`` is that active run (``None`` if it ended before it could be looked up).
    """


class InvalidTransition(_AboutARun):
    """A status change the workflow graph does not allow, or on a run that cannot move.

    ``from_status`` / ``to_status``: the statuses involved (members of the workflow's
    status enum); ``run_state``: the run's :class:`~pgflow.RunState` when that is why it
    cannot move. Each is ``None`` where it does not apply.
    """

    def __init__(
        self,
        message: str,
        *,
        from_status: Enum | None = None,
        to_status: Enum | None = None,
        run_state: Enum | None = None,
        **run: Unpack[_Run],
    ) -> None:
        super().__init__(message, **run)
        self.from_status = from_status
        self.to_status = to_status
        self.run_state = run_state


class RunPaused(InvalidTransition):
    """A callback for a paused run: refused (not dropped); deliver it after ``resume``."""


class WorkerFailed(PgflowError):
    """A worker could not keep its consumers running (a task kept dying); it exits."""


class ReplayFailed(PgflowError):
    """The connector function raised again while replaying a dead letter."""

    def __init__(self, message: str, *, dead_letter_id: int | None = None) -> None:
        super().__init__(message)
        self.dead_letter_id = dead_letter_id


class LostCursor(PgflowError):
    """The cursor moved under us: another process applied this batch first.

    ``cursor`` names it (consumer, and shard when sharded). The transaction that
    tried to move it must roll back; the next batch re-reads the cursor.
    """

    def __init__(self, cursor: str) -> None:
        super().__init__(cursor)
        self.cursor = cursor


class MalformedEvent(PgflowError):
    """A source message that cannot become a :class:`~pgflow.ConnectorEvent` (bad input).

    Raised by ``recv()`` / ``recv_batch_in()`` instead of returning an event. Nothing is
    lost: the message stays unacknowledged until the runner records it (e.g. in
    ``pgflow.dead_letters`` with ``reason`` and ``payload``) and calls ``ack()`` — for a
    transactional consumer inside the same transaction — which moves the consumer past
    it. A runner that ignores this error sees the same message again on the next call.
    """

    def __init__(
        self,
        reason: str,
        *,
        event_id: str,
        payload: Any = None,
        ack: Callable[[], Awaitable[None]] | None = None,
        foreign_id: str | None = None,
    ) -> None:
        super().__init__(f"malformed event {event_id}: {reason}")
        self.reason = reason
        self.event_id = event_id
        self.payload = payload  #: the raw message, JSON-serialisable where possible
        self.foreign_id = foreign_id

        async def _noop() -> None:
            return None

        self.ack: Callable[[], Awaitable[None]] = ack if ack is not None else _noop


class SignatureError(PgflowError, ValueError):
    """A missing, malformed, wrong or stale webhook signature (the reason is the
    message). A ``ValueError`` too, as it was before it moved here."""


class InspectError(PgflowError):
    """Base class of ``pgflow inspect`` errors."""


class InspectRefused(InspectError):
    """The query is not a read-only query over pgflow's relations; nothing was run."""


class InspectFailed(InspectError):
    """The server rejected or cancelled a validated query (bad column, timeout, ...)."""


class Reject(Exception):
    """Raised by a connector function: this event can never succeed (invalid data).

    The runner dead-letters it at once in ``pgflow.dead_letters`` with ``reason``,
    without the retries an ordinary exception gets, and moves on. For transient
    failures (a network error, a lock timeout) raise anything else: those are retried.
    Not a :class:`PgflowError`: it is raised by your code, not by pgflow.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
