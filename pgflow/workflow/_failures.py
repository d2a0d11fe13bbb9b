"""What happens when user code fails: contain it, describe it, count it on the run.

Steps, timers, ``expire`` functions, hooks and connector functions all run user code
that may raise. Each of them asks :func:`contained` whether the exception is that
run's failure or the process's shutdown, records :func:`error_text` (bounded, storable)
and — for code that runs for a record — :func:`record_error`, which counts the attempt
on the record and either schedules the retry or pauses the run
(``pause_after_err_count``). One place, so a timer's failure is counted and paused
exactly as a step's is.
"""

from __future__ import annotations

import asyncio
import logging
import traceback as _traceback
from typing import Any

import psycopg
from psycopg import AsyncConnection

from pgflow.workflow import actions
from pgflow.workflow._engine import Engine
from pgflow.workflow._options import Options
from pgflow.workflow.records import RawRecord, RunState, count_error, set_pause_retry

__all__ = ["AUTO_PAUSE_REASON", "contained", "error_text", "log_failure", "record_error"]

logger = logging.getLogger(__name__)

_ERROR_TEXT_MAX = 2000

#: The run-state reason of a run paused by ``pause_after_err_count`` (luno's words).
AUTO_PAUSE_REASON = "max error retry threshold hit"


def error_text(exc: BaseException, *, traceback: bool = False) -> str:
    """``Type: message`` (then, with ``traceback``, the start of the traceback), cut to
    2000 characters and without NUL characters (a text column refuses them: recording
    the error must not fail because of the error's own message)."""
    text = f"{type(exc).__name__}: {exc}"
    if traceback:
        tb = "".join(_traceback.format_exception(exc)).rstrip()
        text = f"{text}\n{tb}"
    text = text.replace("\x00", "\\x00")
    return text if len(text) <= _ERROR_TEXT_MAX else text[: _ERROR_TEXT_MAX - 3] + "..."


def contained(exc: BaseException) -> bool:
    """Whether an exception from user code is that run's failure (True) or must end the
    consumer (False).

    A ``psycopg.OperationalError`` is not the run's: the connection is gone, the batch's
    transaction with it, and the whole batch is retried on a new one (a run must not
    count an error, or be paused, for an outage). Every other ``Exception`` is the
    run's. So is a ``CancelledError`` the user's code raised
    by awaiting a task that was cancelled — unless *this* task is being cancelled
    (``Task.cancelling()``): then it is our shutdown and must propagate.
    KeyboardInterrupt, SystemExit and GeneratorExit always propagate.
    """
    if isinstance(exc, Exception):
        return not isinstance(exc, psycopg.OperationalError)
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is None or task.cancelling() == 0
    return False


async def record_error(
    engine: Engine[Any, Any],
    conn: AsyncConnection[Any],
    rec: RawRecord,
    exc: BaseException,
    options: Options,
    *,
    retry_step: bool = True,
) -> RawRecord | None:
    """Count a failed attempt on ``rec``; schedule its retry or pause the run, as the
    failing consumer's ``options`` say (``err_backoff``, ``pause_after_err_count``,
    ``pause_retry``). Returns the paused record, or None (retry scheduled, or the
    record moved meanwhile and nothing was written).

    The version is not bumped (:func:`~pgflow.workflow.records.count_error`): the retry
    event re-emitted by the poller carries the same version, so it is still current
    when it arrives. ``retry_step=False`` (timers: they schedule their own retry) only
    counts and pauses; no event is re-emitted, so the step of the status does not run
    again.

    A pause here records :data:`AUTO_PAUSE_REASON` and, with ``pause_retry``, sets the
    paused run's ``retry_at`` to when the timer poller resumes it (a pause by hand
    clears ``retry_at``, so only automatic pauses are resumed automatically).
    """
    pause_after, pause_retry = options.pause_after_err_count, options.pause_retry
    pausing = pause_after is not None and rec.err_count + 1 >= pause_after
    now = engine.clock.sql_now()
    count = await count_error(
        conn,
        rec,
        error_text(exc, traceback=True),
        pausing=pausing,
        retry_step=retry_step,
        now=now,
        err_backoff_s=options.err_backoff.total_seconds(),
    )
    if count is None or not pausing:
        return None
    logger.warning(
        "%s: run %s of %r paused after %d errors%s: %s",
        rec.workflow,
        rec.run_id,
        rec.foreign_id,
        count,
        f" (resumed in {pause_retry})" if pause_retry is not None else "",
        error_text(exc),
    )
    paused = await actions.pause(
        conn,
        rec.workflow,
        rec.foreign_id,
        rec.run_id,
        hook=engine.state_hook(RunState.PAUSED),
        reason=AUTO_PAUSE_REASON,
    )
    if pause_retry is not None:
        await set_pause_retry(conn, paused, now, pause_retry)
    return paused


def log_failure(
    log: logging.Logger, what: str, rec: RawRecord, exc: BaseException, then: str = ""
) -> None:
    """Warn that ``what`` (e.g. ``"orders/poller: expire remind"``) failed for ``rec``,
    with the attempt number and the traceback; ``then`` ends the message (what
    happens next). One wording for every kind of user code, on the caller's logger."""
    log.warning(
        "%s failed for run %s (foreign id %r, attempt %d): %s%s",
        what,
        rec.run_id,
        rec.foreign_id,
        rec.err_count + 1,
        error_text(exc),
        then,
        exc_info=exc,
    )
