"""The examples the README points at run, against a real database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("script", "expect"),
    [("orders.py", "SHIPPED (COMPLETED)"), ("payments_from_table.py", "COMPLETED")],
)
def test_example_runs(pgflow_dsn: str, script: str, expect: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--dsn", pgflow_dsn],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout
