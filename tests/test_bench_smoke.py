"""Every benchmark's ``--quick`` mode runs end to end and writes valid JSON.

No timing asserts: performance claims come from the benchmarks' own output, never from
unit tests. This only keeps the scripts anyone can run from rotting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pgflow.testing import TestDatabases

# every benchmark in a subprocess: ~40 s together
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _run_bench(
    name: str, server: TestDatabases, tmp_path: Path, *extra: str
) -> tuple[dict[str, Any], str]:
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / f"{name}.py"),
            "--quick",
            "--dsn",
            server.server,
            "--out",
            str(out),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["benchmark"] == name and doc["quick"] is True
    return doc, result.stdout


def test_stream_bench_quick(pgflow_server: TestDatabases, tmp_path: Path) -> None:
    doc, stdout = _run_bench("stream", pgflow_server, tmp_path)
    assert doc["tail"]["events"] == 20_000
    assert doc["tail"]["pgflow_events_per_s"] > 0
    assert [lat["mode"] for lat in doc["latency"]] == ["notify", "poke", "poll"]
    assert all(lat["received"] > 0 for lat in doc["latency"])
    assert doc["writers"]["alone"]["commits"] > 0
    assert doc["writers"]["with_listener"]["batches"].get("wakeups", 0) > 0
    assert doc["writers"]["with_listener_consumer"]["consumed"] > 0
    assert "(c) ratio listener/without" in stdout


def test_workflow_bench_quick(pgflow_server: TestDatabases, tmp_path: Path) -> None:
    doc, stdout = _run_bench("workflow", pgflow_server, tmp_path, "--no-dbos", "--runs", "300")
    assert "runs_per_s" in stdout
    systems = {(r["system"], r["steps"], r["workers"]) for r in doc["rows"]}
    assert ("pgflow", 1, 1) in systems and ("pgflow", 3, 2) in systems
    assert ("hand-written", 1, 1) in systems
    assert all(r["runs_per_s"] > 0 for r in doc["rows"])
    if os.environ.get("PGFLOW_TEST_PGBOUNCER") == "required" or "row skipped" not in stdout:
        assert ("pgflow+pgbouncer", 1, 1) in systems and doc["pgbouncer_ratio"] > 0
        assert "through pgbouncer / direct" in stdout


def test_connectors_bench_quick(pgflow_server: TestDatabases, tmp_path: Path) -> None:
    doc, stdout = _run_bench("connectors", pgflow_server, tmp_path)
    names = [row["scenario"] for row in doc["scenarios"]]
    assert names[:5] == [
        "memory p1",
        "memory p4",
        "memory-broker p1",
        "memory-broker p4",
        "table p1",
    ]
    assert any(n.startswith("webhook accept") for n in names)
    assert all(row["events_per_s"] > 0 for row in doc["scenarios"])
    assert "memory connector -> trigger" in stdout


def test_tracing_bench_quick(pgflow_server: TestDatabases, tmp_path: Path) -> None:
    doc, stdout = _run_bench("tracing", pgflow_server, tmp_path)
    assert {row["tracing"] for row in doc["rows"]} >= {"off", "on"}
    assert all(row["runs_per_s"] > 0 for row in doc["rows"])
    assert "on / off" in stdout


def test_ui_bench_quick(pgflow_server: TestDatabases, tmp_path: Path) -> None:
    doc, stdout = _run_bench("ui", pgflow_server, tmp_path)
    assert doc["load"]["runs"] == 20_000 and doc["load"]["events"] == 100_000
    pages = {row["page"] for row in doc["pages"]}
    assert {"runs (all)", "run", "workflows", "consumers", "dead letters", "query"} <= pages
    assert all(row["p95_ms"] > 0 for row in doc["pages"])
    assert "slowest page p95" in stdout


def test_list_bench_quick(pgflow_server: TestDatabases, tmp_path: Path) -> None:
    doc, stdout = _run_bench("list", pgflow_server, tmp_path)
    assert doc["records"] == 20_000
    names = [s["name"] for s in doc["scenarios"]]
    assert "run_state = PAUSED (0.1%)" in names and len(names) == 8
    assert all(s["rows"] > 0 for s in doc["scenarios"])
    assert "p95 ms" in stdout
