"""``pgflow demo``: the seed example end to end, exit 0, a table of runs and SQL."""

from __future__ import annotations

import pytest

from pgflow.cli import main


def test_pgflow_demo(pgflow_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dsn", pgflow_dsn]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    runs = [line.split()[:3] for line in lines if line.startswith("order-")]
    assert runs == [
        ["order-1", "FULFILLED", "COMPLETED"],
        ["order-1", "REFUND_RECORDED", "COMPLETED"],
        ["order-2", "FULFILLED", "COMPLETED"],
        ["order-3", "CUSTOMER_NOTIFIED", "COMPLETED"],
    ]
    assert "missing header 'amount'" in out and "not an ISO 4217 code" in out
    assert "SELECT foreign_id, status, run_state, object FROM pgflow.runs" in out
    assert main(["demo", "--dsn", pgflow_dsn]) == 0  # again: same result, fresh run
    again = capsys.readouterr().out
    assert [line.split()[:3] for line in again.splitlines() if line.startswith("order-")] == runs
