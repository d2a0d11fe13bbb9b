"""Failures a person can see and fix (issue 9): one-line errors and non-zero exits for
a worker that cannot run, and a failing step's traceback in logs, last_error and
``pgflow show``."""

from __future__ import annotations

import enum
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgflow
from pgflow import RunState
from pgflow.cli import main
from pgflow.testing import require_state

ROOT = Path(__file__).resolve().parent.parent
PGFLOW = str(Path(sys.executable).with_name("pgflow"))


def pgflow_cli(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PGFLOW, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def empty_dsn(pgflow_dsn: str) -> str:
    """A database without the pgflow schema."""
    with psycopg.connect(pgflow_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA pgflow CASCADE")
    return pgflow_dsn


def test_worker_without_schema_is_a_one_line_error(empty_dsn: str) -> None:
    result = pgflow_cli("worker", "tests.workflow_app:builder", "--dsn", empty_dsn)
    assert result.returncode == 1
    assert result.stdout == ""  # never says "running"
    assert result.stderr.strip() == (
        "pgflow: error: pgflow schema not installed: run `pgflow migrate` first"
    )


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("Status", "enum Status is not a pgflow.Builder, a pgflow.Workflow, or a factory of one"),
        ("Order", "class Order is not a pgflow.Builder, a pgflow.Workflow, or a factory of one"),
        ("side_effect", "function side_effect() returned a int (1), not a pgflow.Builder or"),
        ("needs_args", "function needs_args() needs arguments: a factory must take none"),
    ],
)
def test_worker_target_that_is_not_a_workflow(
    attr: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    sys.modules.pop("tests.faulty_targets", None)
    code = main(["worker", f"tests.faulty_targets:{attr}", "--dsn", "host=127.0.0.1"])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"pgflow: error: {message}")
    from tests import faulty_targets

    assert (["side_effect"] if attr == "side_effect" else []) == faulty_targets.CALLS


def test_bad_log_level_is_a_usage_error() -> None:
    result = pgflow_cli("--log-level", "bogus", "runs")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "pgflow: error: --log-level: unknown level 'bogus'"
        " (use DEBUG, INFO, WARNING, ERROR or CRITICAL)"
    )


def test_worker_with_webhook_port_in_use_is_a_one_line_error(pgflow_dsn: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [PGFLOW, "worker", "tests.faulty_targets:webhook_workflow", "--dsn", pgflow_dsn],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "FAULTY_WEBHOOK_PORT": str(port), "FAULTY_DSN": pgflow_dsn},
        )
    finally:
        taken.close()
    assert result.returncode == 1, result
    assert result.stderr.strip() == (
        f"pgflow: error: webhook 'hooks': cannot listen on 127.0.0.1:{port}:"
        " Address already in use (is another process using the port?)"
    )


class S(enum.IntEnum):
    START = 1
    END = 2


async def test_failing_step_traceback_is_logged_stored_and_shown(
    pgflow_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    b = pgflow.Builder("visible", dict, S, polling_frequency=0.1)

    def charge_card(run: pgflow.Run[dict[str, Any], S]) -> S:
        raise ValueError("card declined")

    b.add_step(S.START, charge_card, S.END, err_backoff=0.05, pause_after_err_count=1)
    caplog.set_level(logging.WARNING, logger="pgflow.workflow._steps")
    async with b.build(pgflow_dsn) as wf:
        run_id = await wf.trigger("order-7")
        rec = await require_state(wf, "order-7", RunState.PAUSED)
    failed = [r for r in caplog.records if "failed for run" in r.getMessage()]
    assert failed, caplog.text
    msg = failed[0].getMessage()
    for part in ("workflow visible", "status START", run_id, "'order-7'", "card declined"):
        assert part in msg
    assert failed[0].exc_info is not None  # the traceback goes to the log
    assert rec.last_error.startswith("ValueError: card declined\nTraceback (most recent")
    assert "in charge_card" in rec.last_error
    result = pgflow_cli("show", "order-7", "--dsn", pgflow_dsn)
    out = result.stdout
    assert result.returncode == 0, result
    record = dict(line.split(None, 1) for line in out.splitlines()[1:] if line[:1].isalpha())
    assert record["last_error"] == "ValueError: card declined"
    assert "  Traceback (most recent call last):" in out
    assert "in charge_card" in out
