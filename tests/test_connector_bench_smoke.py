"""``bench/connectors.py --quick`` runs end to end and writes valid JSON (no timing
asserts: performance claims come from the benchmark's output, never from unit tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pgflow.testing import TestDatabases

BENCH = Path(__file__).resolve().parent.parent / "bench" / "connectors.py"


def test_connectors_bench_quick(pgflow_server: TestDatabases, tmp_path: Path) -> None:
    out = tmp_path / "connectors.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--dsn", pgflow_server.server, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "connectors" and doc["quick"] is True
    names = [row["scenario"] for row in doc["scenarios"]]
    assert names[:3] == ["memory p1", "memory p4", "table p1"]
    assert any(n.startswith("webhook accept") for n in names)
    assert all(row["events_per_s"] > 0 for row in doc["scenarios"])
    assert "memory connector -> trigger" in result.stdout
