"""``bench/stream.py --quick`` runs end to end and writes valid JSON (no timing asserts:
performance claims come from the benchmark's own output, never from unit tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pgflow.testing import TestDatabases

BENCH = Path(__file__).resolve().parent.parent / "bench" / "stream.py"


def test_stream_bench_quick(pgflow_server: TestDatabases, tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--dsn", pgflow_server.server, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "stream" and doc["quick"] is True
    assert doc["tail"]["events"] == 20_000
    assert doc["tail"]["pgflow_events_per_s"] > 0
    assert [lat["mode"] for lat in doc["latency"]] == ["notify", "poke", "poll"]
    assert all(lat["received"] > 0 for lat in doc["latency"])
    assert doc["writers"]["alone"]["commits"] > 0
    assert doc["writers"]["with_listener_consumer"]["consumed"] > 0
    assert "(c) ratio with/without" in result.stdout
