"""Smoke test: ``bench/workflow.py --quick`` runs end to end and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pgflow.testing import LOCAL_DSN

ROOT = Path(__file__).resolve().parent.parent


def test_bench_workflow_quick(tmp_path: Path, pgflow_server: object) -> None:
    server = getattr(pgflow_server, "server", LOCAL_DSN)
    out = tmp_path / "workflow.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "workflow.py"),
            "--quick",
            "--no-dbos",
            "--runs",
            "300",
            "--dsn",
            server,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "runs_per_s" in proc.stdout
    doc = json.loads(out.read_text())
    systems = {(r["system"], r["steps"], r["workers"]) for r in doc["rows"]}
    assert ("pgflow", 1, 1) in systems and ("pgflow", 3, 2) in systems
    assert ("hand-written", 1, 1) in systems
    assert all(r["runs_per_s"] > 0 for r in doc["rows"])
